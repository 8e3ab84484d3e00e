"""What a comparison writes: comparison.md (ROUGE-L table, each run's start and optimiser
settings, ExAccErr over training), comparison.png, exposure_bias.png and comparison.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmdistill.config import expand_path
from lmdistill.instruct.evaluate import EvalResult, dataset_name, format_cell


def results_dict(results: dict[str, EvalResult]) -> dict:
    return {k: r.to_dict() for k, r in results.items()}


def comparison_table(rows: dict[str, dict[str, EvalResult] | str], datasets: list[str]) -> str:
    """Markdown: one row per model, one column per dataset, 'mean ± std' or the error."""
    lines = ["| model | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for name, results in rows.items():
        if isinstance(results, str):
            cells = [f"failed: {results.replace('|', '/')}"] + [""] * (len(datasets) - 1)
        else:
            cells = [format_cell(results[d]) if d in results else "-" for d in datasets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_table(runs: dict[str, dict]) -> str:
    """Markdown: each run's start, optimiser settings and selected checkpoint (`runs[name]`: the
    resolved training config, plus `evaluated` and `best` when known)."""
    lines = ["| run | method | starts from | lr | schedule | warm-up | weight decay | betas | evaluated |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, c in runs.items():
        lr = f"{c['lr']:g}" + (f" (prompt {c['prompt_lr']:g})" if c.get("prompt_lr") not in (None, c["lr"]) else "")
        betas = ", ".join(f"{b:g}" for b in c["adam_betas"])
        lines.append(f"| {name} | {c['method']} | `{c['student']}` | {lr} | {c['lr_schedule']} | {c['warmup_steps']} "
                     f"| {c['weight_decay']:g} | {betas} | {c.get('evaluated', '-')} |")
    return "\n".join(lines)


def exposure_bias_table(curves: dict[str, dict[int, dict]], length: int) -> str:
    steps = sorted({s for c in curves.values() for s in c})
    lines = ["| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for name, curve in curves.items():
        cells = [f"{curve[s]['exacc_err'][length - 1]:.1f}" if s in curve else "-" for s in steps]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(cc, rows: dict, curves: dict, runs: dict[str, dict]) -> None:
    out = cc.out
    datasets = [dataset_name(expand_path(f)) for f in cc.eval_data]
    seeds = ", ".join(str(s) for s in cc.eval_seeds)
    n = f"first {cc.eval_max_examples}" if cc.eval_max_examples else "all"
    text = [
        f"# Comparison: {', '.join(cc.methods)}",
        "",
        "Shared budget: " + ", ".join(f"{k}={v}" for k, v in cc.train.items()) + ".",
        f"ROUGE-L (F1 x 100, mean ± std over seeds {seeds}); {n} examples per set; "
        f"{'greedy' if cc.eval_greedy else 'sampled'} responses, max_new_tokens={cc.eval_max_new_tokens}.",
        "",
        comparison_table(rows, datasets),
        "",
        "## Each run's start and optimiser settings",
        "",
        settings_table(runs),
        "",
    ]
    if curves:
        text += [f"## ExAccErr({cc.exposure_bias_length}) over training steps (%)", "",
                 exposure_bias_table(curves, cc.exposure_bias_length), ""]
        plot_exposure_bias_curves(curves, cc.exposure_bias_length, out / "exposure_bias.png")
    (out / "comparison.md").write_text("\n".join(text))
    (out / "comparison.json").write_text(json.dumps(
        {"results": {name: (r if isinstance(r, str) else results_dict(r)) for name, r in rows.items()},
         "runs": runs}, indent=2, default=str))
    plot_comparison(rows, datasets, out / "comparison.png")


def plot_comparison(rows: dict, datasets: list[str], path: Path) -> None:
    """Grouped bars: one group per dataset, one bar per model, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {name: r for name, r in rows.items() if not isinstance(r, str)}
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(datasets) * max(1, len(ok)) / 3), 4))
    width = 0.8 / max(1, len(ok))
    for i, (name, results) in enumerate(ok.items()):
        xs = [d + (i - (len(ok) - 1) / 2) * width for d in range(len(datasets))]
        means = [results[d].mean if d in results else math.nan for d in datasets]
        stds = [results[d].std if d in results else 0.0 for d in datasets]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=name)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("ROUGE-L")
    failed = [name for name, r in rows.items() if isinstance(r, str)]
    ax.set_title("ROUGE-L by method" + (f" (failed: {', '.join(failed)})" if failed else ""))
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_exposure_bias_curves(curves: dict[str, dict[int, dict]], length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        steps = sorted(curve)
        ax.plot(steps, [curve[s]["exacc_err"][length - 1] for s in steps], marker="o", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"ExAccErr({length}) (%)")
    ax.set_title("Exposure bias over training")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
