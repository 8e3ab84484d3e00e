"""lmdistill vs TRL's GKDTrainer: one KD workload, each implementation in its own process.

    python bench/vs_trl.py                       # the three cases, 2 rounds, both sides in lmdistill's precision
    python bench/vs_trl.py --profile             # per-op table of lmdistill's off-policy step
    python bench/vs_trl.py --rounds 3 --cases offpolicy_fkl
    python bench/vs_trl.py --workload gpt2-xl --device cuda --peak-tflops 989   # on a GPU
    python bench/vs_trl.py --workload qwen-coder   # the real pair (`make real-models` first)

Workload (`smollm2`, the default): teacher SmolLM2-135M-Instruct, student = the teacher's
layers 0,3,...,27 (10 of 30), the first 24 Dolly dev rows whose chat-formatted
conversation fits in 256 tokens, batch 4, AdamW lr 2e-5 (constant, no weight decay,
clip 1.0), one warm-up step then 5 timed steps. Cases (GKD's lmbda / beta):
off-policy forward KL (0 / 0), off-policy JSD (0 / 0.5), on-policy (1 / 0.5, 64 new tokens).
`gpt2-xl`: the same with random-weight GPT-2 XL / GPT-2 base shapes. `qwen-coder`: teacher
Qwen2.5-Coder-1.5B-Instruct, student Qwen2.5-Coder-0.5B-Instruct (151,936-token vocabulary),
8 rows of <= 192 tokens, batch 2, 3 timed steps, 32 on-policy tokens (see SIZES).

The "% floor" column is the achieved model-FLOP rate (teacher forward 2N + student forward
and backward 6N per trained token) over a bf16 matmul rate measured in the same run, before
and after the children (the better of the two), unless --peak-tflops gives a datasheet peak.

Both implementations get identical batches: TRL's own chat collator tokenises each row
once here (so "which tokens count" is TRL's: the response, `<|im_end|>` and the newline
after it), and both follow one length-grouped batch order (lmdistill's `BatchOrder`,
fed to TRL through its sampler). TRL computes its loss in float32 with temperature 1 and
divides by the number of response tokens, exactly `losses.generalized_jsd`'s mean, so in
fp32 the per-step losses agree; the table reports the largest difference.

Runs alternate A B A B: each round runs lmdistill then TRL for every case (plus an fp32
lmdistill run of the forward-KL case for the loss check) in fresh subprocesses. A child
reports per-step wall time (data, sampling, forward, backward, optimiser), the
non-padding tokens of the sequences trained on, per-step losses and its peak RSS
(`resource.getrusage`). Raw figures: bench/results/vs_trl-<UTC>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental in 1.16
CASES = {
    "offpolicy_fkl": {"lmbda": 0.0, "beta": 0.0},
    "offpolicy_jsd": {"lmbda": 0.0, "beta": 0.5},
    "onpolicy": {"lmbda": 1.0, "beta": 0.5},
}
# Per workload: rows, batch, longest chat-formatted row, timed steps (after one warm-up) and
# on-policy new tokens. qwen-coder is sized so that TRL's fp32 GKDTrainer (fp32 teacher, fp32
# student + AdamW state, its float32 JSD over [2, <=192, 151,936] logits) stays well under 24 GB.
SIZES = {
    "smollm2": {"rows": 24, "batch": 4, "max_length": 256, "timed_steps": 5, "new_tokens": 64},
    "gpt2-xl": {"rows": 24, "batch": 4, "max_length": 256, "timed_steps": 5, "new_tokens": 64},
    "qwen-coder": {"rows": 8, "batch": 2, "max_length": 192, "timed_steps": 3, "new_tokens": 32},
}
LR = 2e-5


# ----- the workload (built once, in the parent) -----

def dolly_rows() -> list[dict]:
    data = Path(os.environ.get("LMDISTILL_DATA_DIR", ROOT.parent / "shared" / "data")) / "instruct/dolly/dev.jsonl"
    from lmdistill.instruct.data import load_instruction_data

    return [{"user": ex.instruction, "assistant": ex.references[0]} for ex in load_instruction_data(str(data))]


def build_models(workload: str, folder: Path) -> tuple[str, str]:
    """(teacher folder, student folder) for a workload; cached under `folder`."""
    import torch

    from lmdistill.model_zoo import resolve_model
    from lmdistill.models import load_model, load_tokenizer, prune_layers

    if workload == "qwen-coder":
        return resolve_model("qwen2.5-coder-1.5b-instruct"), resolve_model("qwen2.5-coder-0.5b-instruct")
    if workload == "smollm2":
        teacher = resolve_model("smollm2-135m-instruct")
        student = folder / "smollm2-135m-instruct-layers-0-3-27"
        if not (student / "config.json").exists():
            model = prune_layers(load_model(teacher), list(range(0, 30, 3)))
            model.save_pretrained(student, safe_serialization=True)
            load_tokenizer(teacher).save_pretrained(student)
        return teacher, str(student)
    # gpt2-xl: random weights are fine for timing (GPT-2 XL-sized teacher, GPT-2-base-sized student).
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    data = Path(os.environ.get("LMDISTILL_DATA_DIR", ROOT.parent / "shared" / "data"))
    tok = GPT2TokenizerFast.from_pretrained(str(data / "tokenizers/gpt2"))
    tok.pad_token = tok.eos_token
    tok.chat_template = ("{% for m in messages %}{{ '### ' + m['role'] + ':\n' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}")
    paths = []
    for name, (layers, width, heads) in {"gpt2-xl-random": (48, 1600, 25), "gpt2-base-random": (12, 768, 12)}.items():
        path = folder / name
        if not (path / "config.json").exists():
            torch.manual_seed(0)
            config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=len(tok), n_positions=1024)
            GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
            tok.save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1]


def build_workload(teacher: str, out: Path, sizes: dict) -> dict:
    """The first `rows` Dolly rows that fit `max_length`, tokenised by TRL's collator, and the batch order."""
    import torch
    from trl.experimental.utils import DataCollatorForChatML

    from lmdistill.data import BatchOrder
    from lmdistill.models import load_tokenizer

    tok = load_tokenizer(teacher)
    collator = DataCollatorForChatML(tokenizer=tok, max_length=100_000)
    rows = []
    for row in dolly_rows():
        messages = [{"role": "user", "content": row["user"]}, {"role": "assistant", "content": row["assistant"]}]
        one = collator([{"messages": messages}])
        ids, labels = one["input_ids"][0].tolist(), one["labels"][0]
        if len(ids) > sizes["max_length"]:
            continue
        prompt_len = int((labels == -100).sum())
        rows.append({"messages": messages, "prompt": ids[:prompt_len], "response": ids[prompt_len:]})
        if len(rows) == sizes["rows"]:
            break
    order = BatchOrder([len(r["prompt"]) + len(r["response"]) for r in rows], sizes["batch"], seed=0)
    batches = [order.next() for _ in range(1 + sizes["timed_steps"])]
    workload = {"rows": rows, "batches": batches, "teacher": teacher, "sizes": sizes}
    # lmdistill's config validation wants a data file; the rows are loaded from the workload.
    with open(out / "rows.jsonl", "w") as f:
        for r in rows:
            f.write(
                json.dumps({"instruction": r["messages"][0]["content"], "output": r["messages"][1]["content"]}) + "\n"
            )
    every_row_once = torch.equal(torch.tensor(sum(batches, [])).sort().values, torch.arange(len(rows)))
    assert every_row_once, "one epoch, each row once"
    return workload


# ----- children -----


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_lmdistill(spec: dict) -> dict:
    import torch

    import lmdistill.methods as methods
    from lmdistill.data import TokenizedExample
    from lmdistill.methods import load_config
    from lmdistill.trainer import Trainer

    workload = json.loads(Path(spec["workload"]).read_text())
    sizes = workload["sizes"]
    examples = [TokenizedExample(r["prompt"], r["response"], [r["messages"][1]["content"]]) for r in workload["rows"]]
    base = methods.METHODS["gkd"]

    class BenchGKD(base):  # only the data differs: TRL's exact token ids
        def load_examples(self):
            return examples

    methods.METHODS["gkd"] = BenchGKD
    case = CASES[spec["case"]]
    overrides = (
        [
            "method=gkd",
            f"student={spec['student']}",
            f"teacher={spec['teacher']}",
            f"train_data={spec['rows_file']}",
            f"output_dir={spec['scratch']}/lmdistill",
            f"batch_size={sizes['batch']}",
            f"lr={LR}",
            "lr_schedule=constant",
            "weight_decay=0.0",
            "max_grad_norm=1.0",
            f"steps={1 + sizes['timed_steps']}",
            # rows are <= max_length; on-policy samples get all new_tokens, as in TRL
            f"max_length={sizes['max_length'] + sizes['new_tokens']}",
            f"max_prompt_length={sizes['max_length'] - 1}",
            f"max_new_tokens={sizes['new_tokens']}",
            "temperature=1.0",
            "top_p=1.0",
            f"lmbda={case['lmbda']}",
            f"beta={case['beta']}",
            "progress=false",
            "seed=0",
        ]
        + ([f"precision={spec['precision']}"] if spec["precision"] != "default" else [])
    )
    config = load_config(None, overrides)
    trainer = Trainer(config)
    assert [trainer.order.next() for _ in range(1 + sizes["timed_steps"])] == workload["batches"]
    trainer.order.position = 0
    losses, tokens, times = [], [], []
    profiler = None
    for i in range(1 + sizes["timed_steps"]):
        if i == 1 and spec.get("profile"):
            from torch.profiler import ProfilerActivity, profile

            profiler = profile(activities=[ProfilerActivity.CPU])
            profiler.__enter__()
        sync(spec["device"])
        start = time.perf_counter()
        logs = trainer.train_step()
        sync(spec["device"])
        times.append(time.perf_counter() - start)
        trainer.step += 1
        losses.append(logs["jsd"])
        tokens.append(int(logs["tokens"]))
    if profiler is not None:
        profiler.__exit__(None, None, None)
        events = profiler.key_averages()
        Path(spec["profile"]).write_text(
            f"lmdistill {spec['case']} ({config.precision}), {sizes['timed_steps']} timed steps, "
            f"{sum(times[1:]):.2f} s\n\nby self CPU time:\n"
            + events.table(sort_by="self_cpu_time_total", row_limit=40)
            + "\n\nby total CPU time (ranges: optimizer step, autograd functions, modules):\n"
            + events.table(sort_by="cpu_time_total", row_limit=40)
        )
    return {
        "precision": config.precision,
        "losses": losses,
        "tokens": tokens,
        "step_times": times,
        "gpu_peak_mb": gpu_peak_mb(spec["device"]),
        "torch_threads": torch.get_num_threads(),
    }


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from lmdistill.models import load_tokenizer

    workload = json.loads(Path(spec["workload"]).read_text())
    sizes = workload["sizes"]
    order = sum(workload["batches"], [])
    case = CASES[spec["case"]]
    record = {"losses": [], "tokens": [], "ends": []}

    class FixedOrder(torch.utils.data.Sampler):
        def __iter__(self):
            return iter(order)

        def __len__(self):
            return len(order)

    class BenchGKDTrainer(GKDTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return FixedOrder()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            record["losses"].append(float((loss[0] if return_outputs else loss).detach()))
            record["tokens"].append(int(inputs["attention_mask"].sum()))  # on-policy: the sampled sequences
            return loss

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            sync(spec["device"])
            record["ends"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            sync(spec["device"])
            record["ends"].append(time.perf_counter())

    device = spec["device"]
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    tok = load_tokenizer(spec["teacher"])
    dataset = Dataset.from_list([{"messages": r["messages"]} for r in workload["rows"]])
    args = GKDConfig(
        output_dir=f"{spec['scratch']}/trl",
        per_device_train_batch_size=sizes["batch"],
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=1 + sizes["timed_steps"],
        lmbda=case["lmbda"],
        beta=case["beta"],
        max_new_tokens=sizes["new_tokens"],
        temperature=1.0,
        max_length=sizes["max_length"],
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        use_cpu=device == "cpu",
        bf16=spec["precision"] == "bf16",
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )
    trainer = BenchGKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[StepClock()],
    )
    trainer.train()
    ends = record["ends"]
    return {
        "precision": "bf16" if args.bf16 else "fp32",
        "losses": record["losses"],
        "tokens": record["tokens"],
        "step_times": [b - a for a, b in zip(ends, ends[1:])],
        "gpu_peak_mb": gpu_peak_mb(device),
        "torch_threads": torch.get_num_threads(),
    }


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def gpu_peak_mb(device: str):
    if device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    result = (run_lmdistill if spec["impl"] == "lmdistill" else run_trl)(spec)
    timed = result["step_times"][1:]
    result.update(
        {
            "tokens_per_s": sum(result["tokens"][1:]) / sum(timed),
            "s_per_step": sum(timed) / len(timed),
            "peak_rss_mb": peak_rss_mb(),
        }
    )
    Path(spec["result"]).write_text(json.dumps(result))


# ----- the per-op profile of lmdistill's off-policy step (`--profile`) -----


def profile_offpolicy(args) -> None:
    """torch.profiler over lmdistill's timed off-policy forward-KL steps (one child, the headline
    precision); the per-op tables go to bench/results/vs_trl-profile-<UTC>.txt."""
    from lmdistill.model_zoo import cache_dir

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    scratch = Path(tempfile.mkdtemp(prefix="lmdistill-profile-"))
    teacher, student = build_models(args.workload, cache_dir() / "bench")
    workload = build_workload(teacher, scratch, SIZES[args.workload])
    (scratch / "workload.json").write_text(json.dumps(workload))
    out = Path(args.out) / f"vs_trl-profile-{args.workload}-{stamp}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = {"impl": "lmdistill", "case": "offpolicy_fkl", "round": 0, "precision": args.precision,
            "device": args.device, "threads": args.threads, "teacher": teacher, "student": student,
            "workload": str(scratch / "workload.json"), "rows_file": str(scratch / "rows.jsonl"),
            "scratch": str(scratch / "lmdistill"), "profile": str(out)}
    with open(scratch / "children.log", "w") as log_file:
        result = run_child(spec, scratch, log_file)
    print(f"{result['tokens_per_s']:.1f} tokens/s under the profiler; per-op tables: {out}")


# ----- top-k teacher vs dense teacher over several epochs (`--topk-vs-dense`) -----


def topk_vs_dense(args) -> dict:
    """Train the same student for `--topk-epochs` epochs with pure forward-KL KD (kd_ratio 1), three
    ways, one after another in this process: against the dense teacher every step (`dense`); the
    dense teacher in epoch 1 and its remembered top-k after (`reuse`, `teacher_reuse_top_k`); and
    the top-k cache of `lmdistill cache-teacher`, built first, in every epoch (`cache`). Times the
    training of each (and the cache's build), then scores every final student (and the untrained
    one) by the dense forward KL to the teacher on held-out rows and on the training rows."""
    import torch

    from lmdistill.data import collate
    from lmdistill.instruct.data import load_instruction_data, tokenize_examples
    from lmdistill.methods import load_config
    from lmdistill.model_zoo import cache_dir
    from lmdistill.models import load_model, load_tokenizer
    from lmdistill.cache_teacher import cache_teacher
    from lmdistill.trainer import Trainer

    teacher, student = build_models(args.workload, cache_dir() / "bench")
    batch, max_length = SIZES[args.workload]["batch"], SIZES[args.workload]["max_length"]
    scratch = Path(tempfile.mkdtemp(prefix="lmdistill-topk-"))
    tok = load_tokenizer(teacher)
    data = Path(os.environ.get("LMDISTILL_DATA_DIR", ROOT.parent / "shared" / "data")) / "instruct/dolly/dev.jsonl"
    fits = []  # (raw row, tokenized) of the rows whose prompt + response fit max_length untruncated
    for row in load_instruction_data(str(data)):
        tokenized, _ = tokenize_examples([row], tok, "chat", max_length - 1, 10**6)
        if tokenized and len(tokenized[0].prompt) + len(tokenized[0].response) <= max_length:
            fits.append((row, tokenized[0]))
    train_rows, eval_rows = fits[: args.topk_train_rows], fits[args.topk_train_rows : args.topk_train_rows + 32]
    with open(scratch / "train.jsonl", "w") as f:
        for row, _ in train_rows:
            f.write(json.dumps({"instruction": row.instruction, "output": row.references[0]}) + "\n")
    steps = args.topk_epochs * (len(train_rows) // batch)
    precision = args.precision if args.precision != "default" else default_precision()
    common = [
        "method=kd",
        f"student={student}",
        f"teacher={teacher}",
        f"train_data={scratch / 'train.jsonl'}",
        "kd_ratio=1.0",
        f"steps={steps}",
        f"batch_size={batch}",
        "lr=1e-4",
        "lr_schedule=constant",
        f"max_length={max_length}",
        f"max_prompt_length={max_length - 1}",
        "prompt_format=chat",
        f"precision={precision}",
        "progress=false",
        "seed=0",
    ]
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = scratch / "cache"
    started = time.perf_counter()
    cache_teacher(load_config(None, common + [f"output_dir={scratch / 'unused'}"]), cache, top_k=args.top_k)
    cache_seconds = time.perf_counter() - started
    arms = {"dense": [], "reuse": [f"teacher_reuse_top_k={args.top_k}"], "cache": [f"teacher_cache={cache}"]}
    finals, train_losses, seconds, tokens = {}, {}, {}, {}
    for name, extra in arms.items():
        run = scratch / name
        trainer = Trainer(load_config(None, common + [f"output_dir={run}"] + extra))
        started = time.perf_counter()
        trainer.train()
        seconds[name] = time.perf_counter() - started
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train_losses[name] = [m["forward_kl"] for m in metrics if "forward_kl" in m]
        tokens[name] = sum(m.get("tokens", 0) for m in metrics)
        finals[name] = str(run / "student")
        print(f"{name}: {steps} steps in {seconds[name]:.0f} s", flush=True)
        del trainer
    finals = {"untrained": student, **finals}
    dense_teacher = load_model(teacher, torch.float32).eval()

    def batches(rows):
        return [collate([t for _, t in rows[k : k + batch]], tok.pad_token_id) for k in range(0, len(rows), batch)]

    heldout = {name: heldout_forward_kl(path, dense_teacher, batches(eval_rows)) for name, path in finals.items()}
    on_train = {name: heldout_forward_kl(path, dense_teacher, batches(train_rows)) for name, path in finals.items()}
    return {
        "workload": args.workload,
        "precision": precision,
        "top_k": args.top_k,
        "epochs": args.topk_epochs,
        "steps": steps,
        "batch": batch,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "train_seconds": seconds,
        "train_tokens": tokens,
        "cache_seconds": cache_seconds,
        "cache_bytes": sum(p.stat().st_size for p in cache.iterdir()),
        "heldout_forward_kl": heldout,
        "train_rows_forward_kl": on_train,
        "train_forward_kl": train_losses,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def heldout_forward_kl(student: str, dense_teacher, batches) -> float:
    """Dense forward KL(p_T || q_S) of the student at `student` (fp32), per response token of `batches`."""
    import torch

    from lmdistill.methods.targets import distill_loss
    from lmdistill.models import load_model

    model = load_model(str(student), torch.float32).eval()
    total = tokens = 0.0
    with torch.no_grad():
        for batch in batches:
            n = float(batch.targets()[1].sum())
            total += float(distill_loss(model, dense_teacher, batch, "forward_kl")[0]) * n
            tokens += n
    return total / tokens


# ----- the parent -----


def matmul_tflops(device: str, size: int = 2048, repeats: int = 10) -> float:
    """Measured bf16 dense matmul rate (TFLOP/s) with torch's default threads: the floor's rate."""
    import torch

    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def parameter_count(path: str) -> int:
    """Parameters that do matmul work per token: all but an untied input embedding (a lookup).
    The GGUF-converted Qwen pair stores lm_head apart from the embedding, so it is untied."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    n = sum(p.numel() for p in model.parameters())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    return n if head is not None and head.weight is embedding else n - embedding.numel()


def run_child(spec: dict, scratch: Path, log_file) -> dict:
    spec_path = scratch / f"spec-{spec['impl']}-{spec['case']}-{spec['round']}-{spec['precision']}.json"
    spec["result"] = str(spec_path.with_suffix(".result.json"))
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(spec_path)],
        stdout=log_file,
        stderr=log_file,
        cwd=ROOT,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"{spec['impl']} {spec['case']} round {spec['round']} failed (exit {proc.returncode}); see {log_file.name}"
        )
    result = json.loads(Path(spec["result"]).read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def summarise(rows: list[dict], flops_per_token: dict, peak_tflops, peak_label: str = "% peak") -> str:
    lines = []
    header = f"{'case':15} {'impl':10} {'prec':5} {'tokens/s':>9} {'s/step':>7} {'peak RSS MB':>11}"
    if peak_tflops:
        header += f" {peak_label:>7}"
    lines.append(header)
    ratios = []
    for case in dict.fromkeys(r["case"] for r in rows):
        medians = {}
        for impl, precision in dict.fromkeys((r["impl"], r["precision"]) for r in rows if r["case"] == case):
            mine = [r for r in rows if r["case"] == case and r["impl"] == impl and r["precision"] == precision]
            m = {k: statistics.median(r[k] for r in mine) for k in ("tokens_per_s", "s_per_step", "peak_rss_mb")}
            medians[(impl, precision)] = m
            line = (f"{case:15} {impl:10} {precision:5} {m['tokens_per_s']:9.1f} {m['s_per_step']:7.2f} "
                    f"{m['peak_rss_mb']:11.0f}")
            if peak_tflops:
                line += f" {100 * m['tokens_per_s'] * flops_per_token[impl] / (peak_tflops * 1e12):6.2f}%"
            lines.append(line)
        ours = [v for (impl, p), v in medians.items() if impl == "lmdistill" and p == default_precision_of(rows, case)]
        theirs = [v for (impl, p), v in medians.items() if impl == "trl" and p == headline_trl_precision(rows, case)]
        if ours and theirs:
            speed = ours[0]["tokens_per_s"] / theirs[0]["tokens_per_s"]
            memory = ours[0]["peak_rss_mb"] / theirs[0]["peak_rss_mb"]
            per_round = per_round_speedups(rows, case)
            ratios.append(
                f"{case} (lmdistill {default_precision_of(rows, case)} vs TRL {headline_trl_precision(rows, case)}): "
                f"lmdistill/TRL tokens/s x{speed:.2f} (per round: "
                f"{', '.join(f'{s:.2f}' for s in per_round)}), peak RSS x{memory:.2f}"
            )
    return "\n".join(lines + [""] + ratios)


def headline_trl_precision(rows: list[dict], case: str) -> str:
    return next(r["precision"] for r in rows if r["case"] == case and r["impl"] == "trl" and r.get("default"))


def default_precision() -> str:
    """lmdistill's precision when the recipe names none (TrainConfig.precision's default)."""
    import dataclasses

    from lmdistill.config import TrainConfig

    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "precision")


def default_precision_of(rows: list[dict], case: str) -> str:
    return next(r["precision"] for r in rows if r["case"] == case and r["impl"] == "lmdistill" and r.get("default"))


def per_round_speedups(rows: list[dict], case: str) -> list[float]:
    out = []
    for rnd in sorted({r["round"] for r in rows}):
        ours = [
            r
            for r in rows
            if r["case"] == case and r["round"] == rnd and r["impl"] == "lmdistill" and r.get("default")
        ]
        theirs = [
            r for r in rows if r["case"] == case and r["round"] == rnd and r["impl"] == "trl" and r.get("default")
        ]
        if ours and theirs:
            out.append(ours[0]["tokens_per_s"] / theirs[0]["tokens_per_s"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument(
        "--precision", default="default", help="lmdistill precision: default (the config's), bf16 or fp32"
    )
    parser.add_argument("--no-loss-check", action="store_true", help="skip the fp32 lmdistill run of offpolicy_fkl")
    parser.add_argument("--workload", default="smollm2", choices=list(SIZES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's bf16 peak (default: a measured bf16 matmul)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per child (default: torch's)")
    parser.add_argument(
        "--trl-precision",
        default="same",
        choices=["same", "fp32", "bf16"],
        help="TRL's precision in the headline: same (lmdistill's, bf16 by default), fp32 or bf16",
    )
    parser.add_argument(
        "--trl-fp32-rows",
        default="offpolicy_fkl",
        help="cases that also get a timed fp32 TRL row when the headline TRL run is bf16 (comma-separated, "
        "'all' or 'none'); offpolicy_fkl's also gives the fp32-vs-fp32 loss check",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead: torch.profiler per-op table of lmdistill's timed off-policy forward-KL steps",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument(
        "--topk-vs-dense",
        action="store_true",
        help="instead: KD over --topk-epochs epochs from the dense teacher, from its top-k remembered after "
        "epoch 1 (teacher_reuse_top_k) and from a top-k cache: train time and final forward KL",
    )
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--topk-epochs", type=int, default=3)
    parser.add_argument("--topk-train-rows", type=int, default=96)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    if args.topk_vs_dense:
        result = topk_vs_dense(args)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = Path(args.out) / f"topk_vs_dense-{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        for name, value in result["heldout_forward_kl"].items():
            took = result["train_seconds"].get(name)
            speed = None if took is None else result["train_seconds"]["dense"] / took
            timing = "" if took is None else f"; trained in {took:.0f} s ({speed:.2f}x dense's speed)"
            print(f"forward KL to the teacher, {name:9}: held-out {value:.4f}, training rows "
                  f"{result['train_rows_forward_kl'][name]:.4f}{timing}")
        print(f"cache: {result['cache_bytes'] / 2**20:.1f} MiB, built in {result['cache_seconds']:.0f} s; raw: {path}")
        return

    import torch
    import transformers
    import trl

    from lmdistill.model_zoo import cache_dir

    if args.profile:
        profile_offpolicy(args)
        return
    lm_precision = args.precision if args.precision != "default" else default_precision()
    trl_precision = lm_precision if args.trl_precision == "same" else args.trl_precision
    fp32_rows = [c.strip() for c in args.trl_fp32_rows.split(",") if c.strip() and c.strip() != "none"]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    scratch = Path(tempfile.mkdtemp(prefix="lmdistill-bench-"))
    teacher, student = build_models(args.workload, cache_dir() / "bench")
    workload = build_workload(teacher, scratch, SIZES[args.workload])
    floor_tflops = [matmul_tflops(args.device)]
    (scratch / "workload.json").write_text(json.dumps(workload))
    n_teacher, n_student = parameter_count(teacher), parameter_count(student)
    # Model FLOPs per trained token: teacher forward 2N, student forward + backward 6N.
    flops = 2 * n_teacher + 6 * n_student
    log_path = scratch / "children.log"
    print(
        f"workload {args.workload}: {len(workload['rows'])} rows, teacher {n_teacher / 1e6:.1f}M, student "
        f"{n_student / 1e6:.1f}M params; logs {log_path}",
        flush=True,
    )
    rows = []
    with open(log_path, "w") as log_file:
        for rnd in range(args.rounds):
            for case in cases:
                runs = [("lmdistill", args.precision, True), ("trl", trl_precision, True)]
                if trl_precision != "fp32" and (fp32_rows == ["all"] or case in fp32_rows):
                    runs.append(("trl", "fp32", False))
                if case == "offpolicy_fkl" and not args.no_loss_check:
                    runs.append(("lmdistill", "fp32", False))
                for impl, precision, is_default in runs:
                    spec = {
                        "impl": impl,
                        "case": case,
                        "round": rnd,
                        "precision": precision,
                        "device": args.device,
                        "threads": args.threads,
                        "teacher": teacher,
                        "student": student,
                        "workload": str(scratch / "workload.json"),
                        "rows_file": str(scratch / "rows.jsonl"),
                        "scratch": str(scratch / f"{impl}-{case}-{rnd}-{precision}"),
                    }
                    result = run_child(spec, scratch, log_file)
                    rows.append({"case": case, "impl": impl, "round": rnd, "default": is_default,
                                 "headline": is_default, "headline_precisions": {"lmdistill": lm_precision,
                                                                               "trl": trl_precision},
                                 **result})
                    print(
                        f"round {rnd} {case:14} {impl:9} {result['precision']:5} {result['tokens_per_s']:7.1f} tok/s "
                        f"{result['s_per_step']:6.2f} s/step {result['peak_rss_mb']:6.0f} MB  losses "
                        f"{' '.join(f'{x:.4f}' for x in result['losses'])}",
                        flush=True,
                    )
    floor_tflops.append(matmul_tflops(args.device))
    loss_check = []
    for rnd in range(args.rounds):
        ours = [
            r
            for r in rows
            if r["case"] == "offpolicy_fkl"
            and r["impl"] == "lmdistill"
            and r["precision"] == "fp32"
            and r["round"] == rnd
        ]
        theirs = [
            r
            for r in rows
            if r["case"] == "offpolicy_fkl" and r["impl"] == "trl" and r["precision"] == "fp32" and r["round"] == rnd
        ]
        if ours and theirs:
            loss_check.append(max(abs(a - b) for a, b in zip(ours[0]["losses"], theirs[0]["losses"])))
    print()
    peak, label = (args.peak_tflops, "% peak") if args.peak_tflops else (max(floor_tflops), "% floor")
    print(summarise(rows, {"lmdistill": flops, "trl": flops}, peak, label))
    if not args.peak_tflops:
        print(
            f"bf16 matmul floor measured before/after: {' / '.join(f'{t:.3f}' for t in floor_tflops)} TFLOP/s; "
            f"model FLOPs per trained token {flops / 1e9:.2f} G"
        )
    if loss_check:
        print(
            f"fp32 offpolicy_fkl per-step loss, max |lmdistill - TRL| per round: "
            f"{', '.join(f'{d:.2e}' for d in loss_check)} (requirement: <= 1e-3)"
        )
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }
    for r in rows:
        r.update(
            machine=machine,
            workload=args.workload,
            sizes=SIZES[args.workload],
            model_flops_per_token=flops,
            bf16_matmul_tflops=floor_tflops,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"vs_trl-{stamp}.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"raw figures: {path}")


if __name__ == "__main__":
    main()
