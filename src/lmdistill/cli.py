"""The `lmdistill` command line. Each subcommand is a small function over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys


def cmd_train(args) -> int:
    from lmdistill.methods import load_config
    from lmdistill.trainer import train

    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    config = load_config(args.recipe, overrides)
    run_dir = train(config)
    print(f"run folder: {run_dir}\nstudent (Hugging Face format): {run_dir / 'student'}")
    return 0


def cmd_eval(args) -> int:
    if args.task:
        return cmd_eval_reasoning(args)
    if not args.data:
        raise SystemExit("lmdistill eval: error: --data is required (or --task for the reasoning datasets)")
    from lmdistill.instruct.evaluate import GenerationSettings, evaluate, format_table, write_results
    from lmdistill.models import precision_dtype

    # Responses: at most 256 new tokens by default, as the references' evaluation (MiniLLM/PromptKD).
    max_new_tokens = 256 if args.max_new_tokens is None else args.max_new_tokens
    settings = GenerationSettings(greedy=args.greedy, max_length=args.max_length, max_new_tokens=max_new_tokens,
                                  batch_size=args.batch_size)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results = evaluate(args.model, args.data, max_examples=args.max_examples, seeds=seeds,
                       prompt_format=args.prompt_format, settings=settings, dtype=precision_dtype(args.precision))
    print(format_table({args.model: results}))
    if args.out:
        write_results(results, args.out)
        print(f"results: {args.out}")
    return 0


def cmd_eval_reasoning(args) -> int:
    """Accuracy on esnli/anli1/cqa/svamp or a JSONL file (greedy; Distilling step-by-step)."""
    import json

    from lmdistill.models import precision_dtype
    from lmdistill.reasoning.evaluate import evaluate_reasoning, format_reasoning_table

    if args.task == "jsonl" and not args.data:
        raise SystemExit("lmdistill eval: error: --task jsonl needs --data FILE.jsonl")
    source = args.data[0] if args.data else None
    result = evaluate_reasoning(args.model, args.task, args.split, source, max_examples=args.max_examples,
                                label_prefix=args.label_prefix,
                                prompt_format=None if args.prompt_format == "auto" else args.prompt_format,
                                with_rationale=args.with_rationale, max_new_tokens=args.max_new_tokens or 64,
                                batch_size=args.batch_size, metric=args.metric, dtype=precision_dtype(args.precision))
    if args.with_rationale:
        for s in result.samples:
            print(f"--- {s['id']} ({'right' if s['correct'] else 'wrong'})\n{s['input']}\n"
                  f"rationale: {s['rationale']}\nlabel: {s['prediction']}   gold: {s['gold']}")
    print(format_reasoning_table({args.model: result}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
        print(f"results: {args.out}")
    return 0


def cmd_prune(args) -> int:
    from lmdistill.models import parse_layer_list, prune

    out = prune(args.model, parse_layer_list(args.keep_layers), args.out, args.trust_remote_code)
    print(f"pruned student: {out}")
    return 0


def cmd_generate(args) -> int:
    from lmdistill.generate import config_from_args, generate
    from lmdistill.teacher.openai_client import ServerError

    config = config_from_args(args)
    try:
        stats = generate(config)
    except ServerError as e:  # finished records are already in --out: a rerun resumes
        print(f"lmdistill generate: error: {e}\nfinished records are kept in {config.out}; rerun to resume",
              file=sys.stderr)
        return 3
    print(f"{config.out}: {stats.describe()}")
    return 0


def cmd_check(args) -> int:
    from lmdistill.check import preflight
    from lmdistill.methods import load_config
    from lmdistill.models import load_model, load_tokenizer

    overrides = [f"student={args.student}", f"teacher={args.teacher}"]
    given = {"method": args.method, "train_data": args.data, "batch_size": args.batch_size,
             "max_length": args.max_length, "precision": args.precision}
    if args.recipe is None:  # the recipe's own values stand unless a flag is given
        given = {"train_data": "not-given", "method": "kd", **{k: v for k, v in given.items() if v is not None}}
    overrides += [f"{k}={v}" for k, v in given.items() if v is not None] + list(args.overrides)
    config = load_config(args.recipe, overrides)
    if config.teacher and config.teacher.startswith("openai:"):
        from lmdistill.models import ModelError

        raise ModelError(f"teacher '{config.teacher}' is a served teacher: check compares two local models' "
                         "tokenizers, special tokens, templates and weights, which a server does not expose; "
                         "training checks the server's tokens against the student's on its first answers")
    student_tok, teacher_tok = load_tokenizer(config.student), load_tokenizer(config.teacher)
    student = load_model(config.student)
    teacher = load_model(config.teacher)
    report = preflight(config, student, teacher, student_tok, teacher_tok)
    print(f"lmdistill check: teacher {config.teacher}, student {config.student}, method {config.method}, "
          f"batch {config.batch_size} x {config.max_length} tokens, {config.precision}")
    print(report.text())
    return 1 if report.errors else 0


def cmd_compare(args) -> int:
    from lmdistill.compare.config import load_compare_config
    from lmdistill.compare.runner import run_compare

    out = run_compare(load_compare_config(args.recipe, args.overrides))
    print((out / "comparison.md").read_text())
    print(f"comparison: {out / 'comparison.md'} and {out / 'comparison.png'}")
    return 0


def cmd_exposure_bias(args) -> int:
    from pathlib import Path

    from lmdistill.config import ConfigError
    from lmdistill.instruct.data import load_instruction_data
    from lmdistill.instruct.exposure_bias import measure_exposure_bias, tokenized_prompts, write_report
    from lmdistill.models import load_model, load_tokenizer
    from lmdistill.methods.promptkd import soft_prompt_embeddings
    from lmdistill.sampling import eos_token_ids

    for flag in ("max_examples", "max_length", "samples", "batch_size", "max_prompt_length"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')}: expected > 0, got {getattr(args, flag)}")
    tokenizer = load_tokenizer(args.model)
    examples = load_instruction_data(args.data, split="validation", limit=args.max_examples)
    prompts = tokenized_prompts(examples, tokenizer, args.prompt_format, args.max_prompt_length)
    student, teacher = load_model(args.model).eval(), load_model(args.teacher).eval()
    prefix = soft_prompt_embeddings(args.teacher_prompt, teacher) if args.teacher_prompt else None
    result = measure_exposure_bias(
        student,
        teacher,
        prompts,
        eos_token_ids(student, tokenizer),
        tokenizer.pad_token_id,
        args.max_length,
        args.samples,
        args.seed,
        args.batch_size,
        args.no_repeat_ngram_size,
        args.averaging,
        prefix,
    )
    out = (
        Path(args.out)
        if args.out
        else (Path(args.model) / "exposure_bias" if Path(args.model).is_dir() else Path("exposure_bias"))
    )
    write_report(result, out, args.model, header=f"Teacher (oracle) `{args.teacher}`, prompts from `{args.data}`.\n\n")
    print(result.table())
    print(f"exposure bias: {out / 'exposure_bias.md'} and {out / 'exposure_bias.png'}")
    return 0


def cmd_push(args) -> int:
    from lmdistill.model_card import push

    url = push(args.run_dir, args.repo_id, adapter=args.adapter, private=args.private)
    print(f"pushed {args.run_dir} to {args.repo_id}: {url}")
    return 0


def cmd_draft_eval(args) -> int:
    from pathlib import Path

    from lmdistill.config import ConfigError
    from lmdistill.draft import draft_eval
    from lmdistill.models import precision_dtype

    for flag in ("max_examples", "batch_size", "gamma", "max_new_tokens", "max_length", "max_prompt_length"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')}: expected > 0, got {getattr(args, flag)}")
    if args.measure_prompts < 0 or args.temperature <= 0:
        raise ConfigError(f"--measure-prompts: expected >= 0, got {args.measure_prompts}" if args.measure_prompts < 0
                          else f"--temperature: expected > 0, got {args.temperature}")
    try:
        gammas = tuple(int(g) for g in args.gammas.split(",") if g.strip())
    except ValueError:
        raise ConfigError(f"--gammas: expected comma-separated integers, got {args.gammas!r}") from None
    if not gammas or min(gammas) < 0:
        raise ConfigError(f"--gammas: expected integers >= 0, got {args.gammas!r}")
    report = draft_eval(args.target, args.draft, args.data, max_examples=args.max_examples,
                        batch_size=args.batch_size, prompt_format=args.prompt_format,
                        max_prompt_length=args.max_prompt_length, max_length=args.max_length,
                        temperature=args.temperature, gammas=gammas, measure_prompts=args.measure_prompts,
                        gamma=args.gamma, max_new_tokens=args.max_new_tokens, seed=args.seed,
                        dtype=precision_dtype(args.precision))
    print(report.table())
    if args.out:
        report.write(args.out)
        print(f"results: {args.out}")
        run_dir = Path(args.out).parent
        if (run_dir / "config.yaml").exists():  # a run folder: its students' model cards show alpha
            from lmdistill.model_card import refresh_cards

            for card in refresh_cards(run_dir):
                print(f"model card: {card}")
    return 0


def cmd_cache_teacher(args) -> int:
    from lmdistill.cache_teacher import cache_teacher
    from lmdistill.config import ConfigError
    from lmdistill.methods import load_config, method_class

    recipes = [a for a in args.items if "=" not in a]
    if len(recipes) > 1:
        raise ConfigError(f"command line: one recipe expected, got {recipes}")
    overrides = [a for a in args.items if "=" in a] + ([f"teacher={args.teacher}"] if args.teacher else [])
    config = load_config(recipes[0] if recipes else None, overrides)
    out = cache_teacher(config, args.out, args.top_k, args.responses, args.overwrite,
                        turns=method_class(config.method).turns)
    print(f"teacher cache: {out}\ntrain from it with: teacher_cache={out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmdistill", description="Distill large language models into small students."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a student from a YAML recipe")
    p.add_argument("recipe", help="YAML recipe (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of recipe fields")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (same as resume=true)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="ROUGE-L on instruction data, or accuracy on a reasoning task (--task)")
    p.add_argument("--model", required=True, help="model folder, Hub id or alias")
    p.add_argument("--data", nargs="+", help="JSONL evaluation file(s); with --task: the dataset folder or JSONL file")
    p.add_argument(
        "--task",
        choices=["esnli", "anli1", "cqa", "svamp", "jsonl"],
        default=None,
        help="accuracy on a Distilling step-by-step dataset (greedy decoding)",
    )
    p.add_argument("--split", default="test", help="with --task: train, valid (cqa/svamp) or test")
    p.add_argument("--with-rationale", action="store_true", help="with --task: also generate and print rationales")
    p.add_argument("--label-prefix", default=None, help="with --task: input prefix (default: as the run saved it)")
    p.add_argument(
        "--metric",
        choices=["exact", "equation"],
        default=None,
        help="with --task: exact label match or equation value (default: equation for svamp)",
    )
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--seeds", default="10,20,30,40,50", help="comma-separated sampling seeds")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--max-length", type=int, default=512, help="prompt + response token limit")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on response tokens (default: 256 for --data, as the references evaluate; 64 for --task)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "alpaca"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="the weights' precision (which decodes faster depends on the CPU: docs/results.md)")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prune", help="make a student by keeping a subset of decoder layers")
    p.add_argument("--model", required=True)
    p.add_argument("--keep-layers", required=True, help="e.g. 0,3,6,9 or 0-3,9")
    p.add_argument("--out", required=True)
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "generate", help="teacher rationales or responses, from a local model or an OpenAI-compatible server"
    )
    from lmdistill.generate import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("check", help="pre-flight check of a teacher/student pair (vocabulary, EOS, templates, memory)")
    p.add_argument("--teacher", required=True, help="teacher: folder, Hub id or alias")
    p.add_argument("--student", required=True, help="student: folder, Hub id or alias")
    p.add_argument("--method", default=None, help="the training method the pair is for (default kd)")
    p.add_argument("--data", default=None, help="training data (for the prompt format and lengths)")
    p.add_argument("--recipe", default=None, help="a training recipe whose batch, lengths and precision to check")
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's, else 4")
    p.add_argument("--max-length", type=int, default=None, help="default: the recipe's, else 512")
    p.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="default: the recipe's, else bf16")
    p.add_argument("overrides", nargs="*", help="more key=value recipe overrides")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("compare", help="train every listed method from one student and tabulate ROUGE-L")
    p.add_argument("recipe", help="comparison recipe (configs/compare_dolly.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (train.steps=5 for keys of the `train` mapping)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("exposure-bias", help="ExAccErr of a student against a teacher oracle (table and plot)")
    p.add_argument("--model", required=True, help="student folder, Hub id or alias")
    p.add_argument("--teacher", required=True, help="teacher (the oracle): folder, Hub id or alias")
    p.add_argument("--data", required=True, help="JSONL file whose prompts are used")
    p.add_argument("--max-examples", type=int, default=50, help="prompts used")
    p.add_argument("--max-length", type=int, default=32, help="longest generation length l")
    p.add_argument("--samples", type=int, default=1, help="sampled responses per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-prompt-length", type=int, default=256, help="longer prompts are left out")
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "alpaca"])
    p.add_argument("--no-repeat-ngram-size", type=int, default=6, help="n-gram blocking of both rollouts (0: off)")
    p.add_argument(
        "--averaging",
        default="expectation",
        choices=["expectation", "running"],
        help="running: each position averaged over the samples still running (PromptKD's script)",
    )
    p.add_argument(
        "--teacher-prompt",
        default=None,
        help="a PromptKD run's soft_prompt.safetensors: the oracle is the prompted teacher",
    )
    p.add_argument("--out", default=None, help="output folder (default: MODEL/exposure_bias)")
    p.set_defaults(func=cmd_exposure_bias)

    p = sub.add_parser("cache-teacher", help="store the teacher's top-k log-probs for a recipe's data (offline KD)")
    p.add_argument("items", nargs="*", metavar="[recipe.yaml] key=value", help="a training recipe and/or overrides")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--teacher", default=None,
                   help="the teacher, overriding the recipe's: a local model, or openai:URL#MODEL (a server's top-k)")
    p.add_argument("--top-k", type=int, default=64, help="teacher tokens kept per position (default 64)")
    p.add_argument(
        "--responses",
        default="dataset",
        choices=["dataset", "teacher"],
        help="cache the dataset responses, or responses the teacher samples first (for seqkd)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
    p.set_defaults(func=cmd_cache_teacher)

    p = sub.add_parser("draft-eval", help="a student as its teacher's speculative-decoding draft: token acceptance "
                       "rate, expected tokens per target call, measured assisted-generation speed-up")
    p.add_argument("--target", required=True, help="the target (teacher): folder, Hub id or alias")
    p.add_argument("--draft", required=True, help="the draft (student): folder, Hub id or alias; same vocabulary")
    p.add_argument("--data", required=True, help="held-out instruction data (JSONL etc.) whose responses are scored")
    p.add_argument("--max-examples", type=int, default=64, help="examples scored for alpha")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "alpaca"])
    p.add_argument("--max-prompt-length", type=int, default=256, help="longer prompts are left out")
    p.add_argument("--max-length", type=int, default=512, help="prompt + response token limit")
    p.add_argument("--temperature", type=float, default=1.0, help="of alpha and of the sampling run")
    p.add_argument("--gammas", default="1,3,5", help="drafted tokens per call for the expected tokens per call")
    p.add_argument("--gamma", type=int, default=5, help="drafted tokens per call in the measured run")
    p.add_argument("--measure-prompts", type=int, default=8, help="prompts of the measured run (0: none)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt in the measured run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="weights of both models")
    p.add_argument("--out", default=None, help="write the report JSON here (RUN_DIR/draft_eval.json: the "
                   "student's model card shows it)")
    p.set_defaults(func=cmd_draft_eval)

    p = sub.add_parser("push", help="upload a run's student (or LoRA adapter) with its model card to the Hub")
    p.add_argument("run_dir", help="the run folder (output_dir of `lmdistill train`)")
    p.add_argument("repo_id", help="Hub repository, e.g. me/smollm2-distilled")
    p.add_argument("--adapter", action="store_true", help="push student_adapter/ (a LoRA run) instead of student/")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.set_defaults(func=cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lmdistill.reasoning.arithmetic import EquationError
    from lmdistill.checkpoint import CheckpointError
    from lmdistill.config import ConfigError
    from lmdistill.data import DataError
    from lmdistill.models import ModelError
    from lmdistill.teacher.openai_client import ServerError
    from lmdistill.trainer import TrainingError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per weight load is noise next to ours
    try:
        return args.func(args)
    except (ConfigError, DataError, ModelError, TrainingError, CheckpointError, EquationError, ServerError) as e:
        # The project's own errors name the file, line or key: one line, no traceback.
        print(f"lmdistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        detail = f": {e}" if str(e) else ""
        hint = " (continue with --resume)" if args.command == "train" else ""
        print(f"lmdistill {args.command}: interrupted{detail}{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
