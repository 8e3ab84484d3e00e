"""The `lmdistill` command line. Each subcommand is a small function over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys


def cmd_train(args) -> int:
    from lmdistill.config import load_config
    from lmdistill.trainer import train

    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    config = load_config(args.recipe, overrides)
    run_dir = train(config)
    print(f"run folder: {run_dir}\nstudent (Hugging Face format): {run_dir / 'student'}")
    return 0


def cmd_eval(args) -> int:
    from lmdistill.evaluate import GenerationSettings, evaluate, format_table, write_results

    settings = GenerationSettings(greedy=args.greedy, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results = evaluate(args.model, args.data, max_examples=args.max_examples, seeds=seeds,
                       prompt_format=args.prompt_format, settings=settings)
    print(format_table({args.model: results}))
    if args.out:
        write_results(results, args.out)
        print(f"results: {args.out}")
    return 0


def cmd_prune(args) -> int:
    from lmdistill.models import parse_layer_list, prune

    out = prune(args.model, parse_layer_list(args.keep_layers), args.out, args.trust_remote_code)
    print(f"pruned student: {out}")
    return 0


def cmd_generate(args) -> int:
    from lmdistill.generate import config_from_args, generate
    from lmdistill.openai_backend import ServerError

    config = config_from_args(args)
    try:
        stats = generate(config)
    except ServerError as e:  # finished records are already in --out: a rerun resumes
        print(f"lmdistill generate: error: {e}\nfinished records are kept in {config.out}; rerun to resume",
              file=sys.stderr)
        return 3
    print(f"{config.out}: {stats.describe()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmdistill", description="Distill large language models into small students.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a student from a YAML recipe")
    p.add_argument("recipe", help="YAML recipe (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of recipe fields")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (same as resume=true)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="ROUGE-L of a model on instruction data")
    p.add_argument("--model", required=True, help="model folder, Hub id or alias")
    p.add_argument("--data", required=True, nargs="+", help="JSONL evaluation file(s)")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--seeds", default="10,20,30,40,50", help="comma-separated sampling seeds")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--max-length", type=int, default=512, help="prompt + response token limit")
    p.add_argument("--max-new-tokens", type=int, default=None, help="extra cap on response length")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "alpaca"])
    p.add_argument("--out", default=None, help="write results JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prune", help="make a student by keeping a subset of decoder layers")
    p.add_argument("--model", required=True)
    p.add_argument("--keep-layers", required=True, help="e.g. 0,3,6,9 or 0-3,9")
    p.add_argument("--out", required=True)
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("generate", help="teacher rationales or responses, from a local model or an OpenAI-compatible server")
    from lmdistill.generate import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lmdistill.config import ConfigError
    from lmdistill.data import DataError
    from lmdistill.models import ModelError
    from lmdistill.trainer import TrainingError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, DataError, ModelError, TrainingError) as e:
        print(f"lmdistill {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
