"""Decoding speed: lmdistill's sampler vs HF `generate`, with the machine's weight-read floor.

    python bench/decode.py                                   # SmolLM2-135M, bf16, batch 1/8/32, greedy + sampling
    python bench/decode.py --models smollm2,qwen0.5b --rounds 3
    python bench/decode.py --levers                          # also each lever on its own

Same prompts (the first Dolly validation instructions, chat-formatted), same settings (at most
`--new-tokens` new tokens, stop at the model's EOS ids, temperature 1 / top-p 1 / top-k off when
sampling) for every implementation:

  hf         `model.generate` (HF's loop, DynamicCache, logits processors)
  old        `sample_responses(fast=False)`: lmdistill's loop before the static cache, every
             step through the model's HF forward (the decoding of every earlier result)
  lmdistill  `sample_responses()`: static KV cache + finished rows dropped + bf16 weights
             prepacked, q|k|v and gate|up fused (decode_step.StaticStep)
  --levers adds `static` (static cache only), `static+drop` (no prepacking), `unfused`
             (prepacked, each projection its own product, HF's norm and rotary ops) and `native-gemv`
             (lmdistill with oneDNN switched off in the decoding steps of one row, so their
             bf16 products run torch's own matrix-vector kernel: not bit-equal to oneDNN's)

Runs are interleaved (round r runs every implementation once, in turn) and reported as medians
with the ratio to HF per round. Figures: tokens/s counts the response tokens kept (up to and
including each row's EOS; the same for all implementations when greedy outputs agree), ms per
step is wall time over the decoding steps run, cpu ms per step the process CPU time over the
same steps (less sensitive to other jobs on a shared machine). Both include the prompts'
forward (prefill), which every implementation runs through HF's forward; it is also timed on
its own each round (`prefill`), and `step ms` is the wall time of the steps after it
((wall - prefill) / (steps - 1)), with its own ratio to HF's. Greedy outputs of lmdistill,
old and HF are compared token for token.

The weight-read floor: a decoding step reads every weight that does matrix work once (all
parameters, less an untied input embedding, which is a lookup), so no step can be faster than
those bytes over the machine's memory read bandwidth, measured here (the best of several
passes of `sum` over a buffer of that size, with the same threads) before and after the runs.
Raw figures: bench/results/decode-<UTC>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"smollm2": "smollm2-135m-instruct", "qwen0.5b": "qwen2.5-coder-0.5b-instruct"}


def read_bandwidth(nbytes: int, repeats: int = 5) -> tuple[float, float]:
    """Measured memory read bandwidth (bytes/s): the best of `repeats` sums over an fp32 buffer of
    `nbytes`, per second of wall time and per second of this process's CPU time (on a shared
    machine the wall figure includes waiting for a core; the CPU figure is what one core streams)."""
    buffer = torch.ones(max(nbytes // 4, 1 << 20))
    buffer.sum()
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        buffer.sum()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, max(time.process_time() - cpu, 1e-6))
    return buffer.numel() * 4 / best_wall, buffer.numel() * 4 / best_cpu


def weight_bytes(model) -> int:
    """Bytes of the weights a decoding step reads: all parameters, less an untied input embedding."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    if head is None or head.weight is not embedding:
        total -= embedding.numel() * embedding.element_size()
    return total


def dolly_prompts(tokenizer, n: int) -> list[list[int]]:
    from lmdistill.instruct.data import load_instruction_data, prompt_ids

    data = Path(os.environ.get("LMDISTILL_DATA_DIR", ROOT.parent / "shared" / "data")) / "instruct/dolly/valid.jsonl"
    examples = load_instruction_data(str(data), split="validation", limit=n)
    return [prompt_ids(e, tokenizer, "chat")[:256] for e in examples]


def kept_tokens(generated: torch.Tensor, eos: list[int]) -> list[list[int]]:
    """Each row's new tokens up to and including its first EOS."""
    rows = []
    for row in generated.tolist():
        end = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


def run_one(impl: str, model, batch, eos: list[int], pad: int, new_tokens: int, sample: bool, seed: int) -> dict:
    from transformers import GenerationConfig

    from lmdistill import decode_step, sampling

    torch.manual_seed(seed)
    patches = []
    if impl in ("static", "static+drop"):
        patches.append((decode_step.StaticStep, "pack_weights", lambda self, batch: None))
    if impl == "unfused":
        pack = decode_step.StaticStep.pack_weights
        patches.append((decode_step.StaticStep, "pack_weights", lambda self, batch: pack(self, batch, fuse=False)))
    if impl == "static":
        patches.append((sampling, "_rows_to_keep", lambda finished: torch.arange(len(finished))))
    if impl == "native-gemv":
        one_row_step = decode_step.StaticStep._step

        def native_step(self, tokens, positions, t):
            with torch.backends.mkldnn.flags(enabled=tokens.shape[0] > 1):
                return one_row_step(self, tokens, positions, t)

        patches.append((decode_step.StaticStep, "_step", native_step))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    P = batch.input_ids.shape[1]
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        if impl == "hf":
            config = GenerationConfig(do_sample=sample, temperature=1.0 if sample else None,
                                      top_p=1.0 if sample else None, top_k=0 if sample else None,
                                      max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad)
            out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 generation_config=config)
            generated = out[:, P:]
        else:
            out = sampling.sample_responses(model, batch, eos, pad, new_tokens, 1.0, 1.0, do_sample=sample,
                                            fast=impl != "old")
            generated = out.input_ids[:, P:]
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = kept_tokens(generated, eos)
    steps = generated.shape[1]
    return {"impl": impl, "wall_s": wall, "cpu_s": cpu, "steps": steps, "tokens": sum(map(len, tokens)),
            "tokens_per_s": sum(map(len, tokens)) / wall, "ms_per_step": 1000 * wall / steps,
            "cpu_ms_per_step": 1000 * cpu / steps, "outputs": tokens}


def prefill_seconds(model, batch, repeats: int = 2) -> float:
    """Wall seconds of the prompts' forward (the first step of every implementation: HF's forward
    with the KV cache, last position's logits only), best of `repeats`."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            began = time.perf_counter()
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=True, logits_to_keep=1)
            best = min(best, time.perf_counter() - began)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--modes", default="greedy,sample")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--levers", action="store_true", help="also each lever alone (see above)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from lmdistill.data import TokenizedExample, collate
    from lmdistill.model_zoo import chunked_model_installed
    from lmdistill.models import load_model, load_tokenizer
    from lmdistill.sampling import eos_token_ids

    hf_logging.set_verbosity_error()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    levers = ["static", "static+drop", "unfused", "native-gemv"]
    impls = ["hf", "old"] + (levers if args.levers else []) + ["lmdistill"]
    batches = [int(b) for b in args.batches.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    rows, floors = [], {}
    started = time.perf_counter()
    load_before = os.getloadavg()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"decode-{stamp}.json"

    def save() -> list[dict]:
        """Write the JSON of every finished model (rewritten after each, so a killed run keeps them)."""
        summary = summary_rows([r for r in rows if r["model"] in floors], floors, impls)
        machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "loadavg_before": load_before,
                   "loadavg_after": os.getloadavg(), "minutes": (time.perf_counter() - started) / 60,
                   "argv": sys.argv[1:]}
        runs = [{k: v for k, v in r.items() if k != "outputs"} for r in rows if r["model"] in floors]
        path.write_text(json.dumps({"machine": machine, "floors": floors, "summary": summary, "runs": runs},
                                   indent=1))
        return summary

    for key in [m.strip() for m in args.models.split(",")]:
        alias = MODELS[key]
        if key != "smollm2" and not chunked_model_installed(alias):
            print(f"{alias}: not installed (make real-models); skipped")
            continue
        model = load_model(alias, dtype).eval()
        tok = load_tokenizer(alias)
        eos, pad = eos_token_ids(model, tok), tok.pad_token_id
        nbytes = weight_bytes(model)
        bandwidth = [read_bandwidth(nbytes)]
        prompts = dolly_prompts(tok, max(batches))
        for B in batches:
            batch = collate([TokenizedExample(p, [], []) for p in prompts[:B]], pad, with_responses=False)
            for mode in modes:
                for rnd in range(args.rounds):
                    prefill = prefill_seconds(model, batch)
                    for impl in impls:
                        r = run_one(impl, model, batch, eos, pad, args.new_tokens, mode == "sample", seed=rnd)
                        # the steps after the prompt's forward, which every implementation runs alike
                        decode_ms = 1000 * max(r["wall_s"] - prefill, 0.0) / max(r["steps"] - 1, 1)
                        r.update(model=alias, dtype=args.dtype, batch=B, mode=mode, round=rnd,
                                 prefill_s=prefill, decode_ms_per_step=decode_ms)
                        rows.append(r)
                        print(f"{key:8} B={B:<3} {mode:6} r{rnd} {impl:11} {r['tokens_per_s']:7.1f} tok/s "
                              f"{r['ms_per_step']:7.1f} ms/step (cpu {r['cpu_ms_per_step']:6.1f}) {r['steps']} steps; "
                              f"prefill {1000 * prefill:.0f} ms, then {decode_ms:.1f} ms/step",
                              flush=True)
        bandwidth.append(read_bandwidth(nbytes))
        floors[alias] = {"weight_bytes": nbytes, "read_gb_per_s": [b[0] / 1e9 for b in bandwidth],
                         "read_gb_per_cpu_s": [b[1] / 1e9 for b in bandwidth],
                         "floor_ms_per_step": 1000 * nbytes / max(b[0] for b in bandwidth),
                         "floor_cpu_ms_per_step": 1000 * nbytes / max(b[1] for b in bandwidth)}
        save()
    print()
    print(summarise(save(), floors))
    print(f"load average before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs); "
          f"raw figures: {path}")


def summary_rows(rows: list[dict], floors: dict, impls: list[str]) -> list[dict]:
    """Per (model, batch, mode, impl): median tokens/s, ms/step, cpu ms/step, the per-round
    ratio of tokens/s to HF's, and (greedy) whether the outputs equal HF's in every round."""
    out = []
    keys = dict.fromkeys((r["model"], r["batch"], r["mode"]) for r in rows)
    for model, B, mode in keys:
        group = [r for r in rows if (r["model"], r["batch"], r["mode"]) == (model, B, mode)]
        hf = {r["round"]: r for r in group if r["impl"] == "hf"}
        for impl in impls:
            mine = [r for r in group if r["impl"] == impl]
            ratios = [r["tokens_per_s"] / hf[r["round"]]["tokens_per_s"] for r in mine]
            decode_ratios = [hf[r["round"]]["decode_ms_per_step"] / r["decode_ms_per_step"] for r in mine
                             if r.get("decode_ms_per_step") and hf[r["round"]].get("decode_ms_per_step")]
            same = ([r["outputs"] == hf[r["round"]]["outputs"] for r in mine if "outputs" in r]
                    if mode == "greedy" else [])
            floor = floors[model]["floor_ms_per_step"]
            floor_cpu = floors[model].get("floor_cpu_ms_per_step")
            out.append({
                "model": model, "batch": B, "mode": mode, "impl": impl,
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                "ms_per_step": statistics.median(r["ms_per_step"] for r in mine),
                "cpu_ms_per_step": statistics.median(r["cpu_ms_per_step"] for r in mine),
                "x_hf_per_round": ratios, "x_hf": statistics.median(ratios),
                "prefill_ms": 1000 * statistics.median(r.get("prefill_s", float("nan")) for r in mine),
                "decode_ms_per_step": statistics.median(r.get("decode_ms_per_step", float("nan")) for r in mine),
                "x_hf_decode_per_round": decode_ratios,
                "x_hf_decode": statistics.median(decode_ratios) if decode_ratios else None,
                "floor_ms_per_step": floor, "floor_cpu_ms_per_step": floor_cpu,
                "greedy_equals_hf": all(same) if same else None,
            })
    return out


def summarise(table: list[dict], floors: dict) -> str:
    lines = [f"{'model':28} {'B':>3} {'mode':6} {'impl':11} {'tok/s':>7} {'ms/step':>8} {'cpu ms':>7} "
             f"{'x HF':>5} {'prefill':>7} {'step ms':>7} {'x HF':>5} {'floor ms':>8} {'floor cpu':>9} {'= HF':>5}"]
    for r in table:
        same = "" if r["greedy_equals_hf"] is None else ("yes" if r["greedy_equals_hf"] else "NO")
        lines.append(f"{r['model']:28} {r['batch']:3} {r['mode']:6} {r['impl']:11} {r['tokens_per_s']:7.1f} "
                     f"{r['ms_per_step']:8.1f} {r['cpu_ms_per_step']:7.1f} {r['x_hf']:5.2f} "
                     f"{r['prefill_ms']:7.0f} {r['decode_ms_per_step']:7.1f} {r['x_hf_decode'] or float('nan'):5.2f} "
                     f"{r['floor_ms_per_step']:8.1f} {r['floor_cpu_ms_per_step'] or float('nan'):9.1f} {same:>5}")
    for model, f in floors.items():
        lines.append(f"{model}: {f['weight_bytes'] / 1e6:.0f} MB of weights per step; read bandwidth "
                     f"{' / '.join(f'{b:.1f}' for b in f['read_gb_per_s'])} GB/s per wall second, "
                     f"{' / '.join(f'{b:.1f}' for b in f['read_gb_per_cpu_s'])} per CPU second (before / after) -> "
                     f"floor {f['floor_ms_per_step']:.1f} ms, {f['floor_cpu_ms_per_step']:.1f} cpu ms per step")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
