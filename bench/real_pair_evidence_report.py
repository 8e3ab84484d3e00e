"""The report of bench/real_pair_evidence.py: tables with paired bootstrap intervals and the
ExAccErr figure, written into its section of docs/results.md from whatever units are finished
(marked partial until all are). Called by `python bench/real_pair_evidence.py --report`.

Paired differences: for each test row, the method's correctness averaged over its finished seeds
minus the baseline's (averaged over its seeds), in points; the 95% interval is the 2.5-97.5
percentile of 10,000 bootstrap resamples of the 200 rows (seed 0). It covers the test-row sampling,
not the spread over training seeds (shown as the ± sd beside it). A difference "holds" when the
interval excludes 0 in the claimed direction, "fails" when it excludes 0 in the other, and
otherwise "cannot be told apart". Each claim's interval is its own 95%; the claims table also gives the
verdict at the Bonferroni level 1 - 0.05/K over its K claims (a family-wise 95%), as one of K claims
would "hold" by chance about K/40 times when no method differs.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "results.md"
FIGURE = ROOT / "docs" / "real_pair_exacc.png"
SECTION_BEGIN, SECTION_END = "<!-- real_pair_evidence:begin -->", "<!-- real_pair_evidence:end -->"
HEADING = "## Evidence on the real pair: Qwen2.5-Coder 0.5B from 1.5B on SVAMP, the papers' protocol (issue 24)"
BOOTSTRAP = 10_000
DEVIATIONS = (
    "Where this differs from the papers' set-ups, and why: LoRA students (one set-up for all; the recipes' "
    "lrs are the references' full-fine-tuning lrs, so PromptKD's 5e-5 and MiniLLM's 5e-6 move LoRA adapters "
    "little in 90 steps); one epoch (the references train 10-20); the teacher's SFT is LoRA for one epoch at the "
    "sft recipe's lr (the references: full, 10 epochs, 5e-5); samples and teacher responses <= 32 tokens (SVAMP "
    "equations are 5-20; the references allow 256); warm-up and DistiLLM's validation interval scaled from 500 "
    "steps to 90; every evaluation in bf16 (memory: the fp32 1.5B was killed beside other jobs); ExAccErr with "
    "bf16 weights on test prompts. student-base-fp32.json keeps the first, fp32 evaluation of the released "
    "student (test 11.5%, n = 200; bf16 gives 13.0%: 5 of the 200 rows change, the size of the precision effect)."
)


def load(results: Path) -> dict[str, dict]:
    return {
        p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json")) if not p.stem.endswith(".failed")
    }


def rows_mean(runs: list[dict]) -> np.ndarray:
    return np.mean([r["test"]["correct"] for r in runs], axis=0) * 100.0


def paired(a: list[dict], b: list[dict]) -> tuple[float, np.ndarray]:
    """(mean difference a - b in points, its bootstrap resamples) over the same test rows."""
    d = rows_mean(a) - rows_mean(b)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(d), size=(BOOTSTRAP, len(d)))
    return float(d.mean()), d[idx].mean(1)


def interval(boot: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """The two-sided 1 - alpha percentile interval of bootstrap resamples (NaNs, from resamples
    where ExAccErr is undefined, left out)."""
    return float(np.nanpercentile(boot, 50 * alpha)), float(np.nanpercentile(boot, 100 - 50 * alpha))


def verdict(lo: float, hi: float, direction: int = 1) -> str:
    if lo * direction > 0 and hi * direction > 0:
        return "holds"
    if lo * direction < 0 and hi * direction < 0:
        return "fails"
    return "cannot be told apart"


def mean_sd(values: list[float]) -> str:
    return (
        f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"
    )


def fmt_diff(a: list[dict], b: list[dict]) -> tuple[str, float, np.ndarray]:
    """The table's "difference [95% CI]" text, and the difference and its resamples for the claims."""
    m, boot = paired(a, b)
    return fmt_interval(m, boot), m, boot


def fmt_interval(value: float, boot: np.ndarray, alpha: float = 0.05) -> str:
    lo, hi = interval(boot, alpha)
    return f"{value:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def second_training(run: str, again: dict) -> str:
    """The sentence for a run trained a second time (its work folder lost): why, and its best dev
    accuracy beside the recorded one (`again`: the orchestrator's retrained/<run>.json)."""
    best, recorded = again["best"], again["recorded_best"]
    at = f" at step {best['step']}" if best.get("step") is not None else ""
    return (
        f"{run} trained a second time ({again['why']}), same seed and data order: best dev {best['value']:.1f}%{at} "
        f"vs {recorded['value']:.1f}% at step {recorded['step']} recorded"
        + (
            ""
            if best["value"] == recorded["value"]
            else " (the second training did not reproduce the first bit for bit)"
        )
    )


def train_wall(runs: list[dict]) -> str:
    """Mean training wall of the runs trained in one attempt: a resumed run's `train_s` counts only
    its last attempt (sbs-step_by_step-f1-s2's: 5 s, the scoring after its 88 steps)."""
    whole = [r["train_s"] for r in runs if not r.get("resumed")]
    if not whole:
        return "- (all resumed)"
    left_out = len(runs) - len(whole)
    return f"{statistics.fmean(whole):.0f}" + (f" ({left_out} resumed left out)" if left_out else "")


def exacc_curve(unit: dict, idx: np.ndarray | None = None) -> np.ndarray:
    free, forced = np.asarray(unit["student_error_rows"]), np.asarray(unit["teacher_error_rows"])
    if idx is not None:
        free, forced = free[idx], forced[idx]
    r, e = free.mean(0), forced.mean(0)
    return np.where(e > 0, 100.0 * (r - e) / np.where(e > 0, e, 1.0), np.nan)


def exacc_boot(unit: dict, other: dict | None = None) -> tuple[float, np.ndarray]:
    """ExAccErr at the longest length (or its difference to `other`, on the same prompts) and its
    bootstrap resamples over prompts."""
    n = len(unit["student_error_rows"])
    rng = np.random.default_rng(0)
    value = exacc_curve(unit)[-1] - (exacc_curve(other)[-1] if other else 0.0)
    boot = []
    for _ in range(2000):
        idx = rng.integers(0, n, size=n)
        boot.append(exacc_curve(unit, idx)[-1] - (exacc_curve(other, idx)[-1] if other else 0.0))
    return float(value), np.asarray(boot)


def exacc_interval(unit: dict) -> tuple[float, float, float]:
    """ExAccErr at the longest length with its 95% bootstrap interval over prompts."""
    value, boot = exacc_boot(unit)
    return (value, *interval(boot))


def plot_exacc(units: dict[str, list[dict]], stats: dict[str, list[tuple]], path: Path) -> None:
    """`units`: each method's points sorted by step; `stats`: their (ExAccErr(L), 95% low, high)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, points in units.items():
        last = points[-1]
        left.plot(range(1, last["length"] + 1), exacc_curve(last), label=f"{method} (step {last['step']})")
        right.errorbar(
            [u["step"] for u in points],
            [s[0] for s in stats[method]],
            yerr=[[s[0] - s[1] for s in stats[method]], [s[2] - s[0] for s in stats[method]]],
            marker="o",
            capsize=3,
            label=method,
        )
    left.set_xlabel("generation length l")
    left.set_ylabel("ExAccErr(l) (%)")
    left.set_title("last checkpoint")
    right.set_xlabel("training step")
    right.set_ylabel("ExAccErr(L) (%), 95% bootstrap over prompts")
    right.set_title("during training")
    for ax in (left, right):
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.legend(fontsize=8)
    fig.suptitle("Qwen2.5-Coder 0.5B students, teacher as oracle (SVAMP test prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section(setup, specs: dict, states: dict) -> str:
    done = load(setup.results)
    finished = sum(s == "finished" for s in states.values())
    out = [
        HEADING,
        "",
        progress_line(finished, len(states)),
        "",
        "```bash",
        "make real-models",
        "python bench/real_pair_evidence.py          # resumes; finished units are skipped",
        "python bench/real_pair_evidence.py --report # this section",
        "```",
        "",
    ]
    out.append(
        "Protocol (bench/real_pair_evidence.py's docstring has it all): SVAMP equations, chat prompt + one-line "
        "hint, greedy, safe evaluator; 720 train rows, the 80-row hold-out as dev (checkpoint = best dev accuracy "
        "of steps 30/60/90), all 200 test rows. Every student is a LoRA student with one set-up (r 16, alpha 32, "
        "dropout 0, every linear layer but the head) and each method's recipe settings (its lr as the recipe "
        "says); budget "
        "one epoch (90 steps x 8 sequences). On-policy methods (gkd, distillm, promptkd, minillm) start from "
        "the SFT init `sft-s0`; sft, kd, "
        "seqkd from the released 0.5B."
    )
    out += ["", DEVIATIONS, ""]
    base = {k: done[k] for k in ("teacher-base", "student-base", "teacher-lora") if k in done}
    if base:
        out += ["| model | dev accuracy, % (n) | test accuracy, % (n) | wall, s |", "|---|---|---|---|"]
        labels = {
            "teacher-base": "teacher 1.5B, released",
            "teacher-lora": "teacher 1.5B, LoRA SFT on train (best on dev)",
            "student-base": "student 0.5B, released",
        }
        for k, r in base.items():
            dev = r["dev"]["accuracy"] if "dev" in r else r["best"]["value"]
            n_dev = r["dev"]["n"] if "dev" in r else (r.get("sizes", {}).get("dev_rows") or 80)  # None: all 80
            test = f"{r['test']['accuracy']:.1f} ({r['test']['n']})"
            out.append(f"| {labels[k]} | {dev:.1f} ({n_dev}) | {test} | {r['wall_s']:.0f} |")
        if "teacher-base" in done and "teacher-lora" in done:
            tuned = done["teacher-lora"]["best"]["value"] > done["teacher-base"]["dev"]["accuracy"]
            out.append(
                f"\nTeacher used for distillation: **{'the LoRA-fine-tuned' if tuned else 'the released'} 1.5B** "
                "(higher dev accuracy)."
            )
        out.append("")
    teacher_test = None
    if "teacher-base" in done and "teacher-lora" in done:
        tuned = done["teacher-lora"]["best"]["value"] > done["teacher-base"]["dev"]["accuracy"]
        teacher_test = done["teacher-lora" if tuned else "teacher-base"]["test"]["accuracy"]

    # PromptKD's claims: each method vs SFT, and PromptKD vs each baseline
    runs = {}
    for name, r in done.items():
        if name.startswith(("teacher", "student", "exacc", "sbs")):
            continue
        runs.setdefault(r["method"], []).append(r)
    claims = []
    if runs:
        out += [
            "| method | start | lr (LoRA) | seeds | test accuracy, % (mean ± sd) | per seed | vs SFT, points "
            "[95% CI] | gap to teacher closed | best dev step | train wall, s (mean of runs not resumed) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        sft = runs.get("sft")
        sft_acc = statistics.fmean(r["test"]["accuracy"] for r in sft) if sft else None
        for method in ("sft", "kd", "seqkd", "gkd", "distillm", "promptkd", "minillm"):
            if method not in runs:
                continue
            rs = sorted(runs[method], key=lambda r: r["seed"])
            accs = [r["test"]["accuracy"] for r in rs]
            diff = gap = "-"
            if sft and method != "sft":
                diff, m, boot = fmt_diff(rs, sft)
                claims.append((f"{method} > sft", m, boot, 1, len(rs), len(sft)))
                if teacher_test is not None and teacher_test > sft_acc:
                    gap = f"{(statistics.fmean(accs) - sft_acc) / (teacher_test - sft_acc):+.2f}"
            start = "SFT init" if "starts" in str(rs[0]["start"]) else "released"
            out.append(
                f"| {method} | {start} | {rs[0]['settings']['lr']:g} | {','.join(str(r['seed']) for r in rs)} | "
                f"{mean_sd(accs)} | {', '.join(f'{a:.1f}' for a in accs)} | {diff} | {gap} | "
                f"{', '.join(str(r['best']['step']) for r in rs)} | "
                f"{train_wall(rs)} |"
            )
        out.append("")
        if "promptkd" in runs:
            for other in ("kd", "seqkd", "gkd", "distillm", "minillm"):
                if other in runs:
                    _, m, boot = fmt_diff(runs["promptkd"], runs[other])
                    claims.append((f"promptkd > {other}", m, boot, 1, len(runs["promptkd"]), len(runs[other])))
        out.append("Gap closed = (method - sft) / (teacher used - sft), test accuracy means.")
        out.append("")
        for method in runs:  # runs that read an init or teacher adapter trained a second time (work folder lost)
            for r in sorted(runs[method], key=lambda r: r["seed"]):
                again = [second_training(n, a) for n, a in r.get("starts_retrained", {}).items()]
                if again:
                    out += [f"{r['unit']} read " + "; and ".join(again) + ".", ""]

    # Distilling step-by-step
    sbs = {}
    for name, r in done.items():
        if name.startswith("sbs-"):
            sbs.setdefault((r["method"], r["fraction"]), []).append(r)
    if sbs:
        palm = next(iter(sbs.values()))[0]["test"].get("teacher_accuracy")
        out += [
            "Distilling step-by-step, the same 0.5B LoRA student, PaLM-540B rationales"
            + (f" (PaLM's own test accuracy {palm:.1f}%)" if palm is not None else "")
            + ":",
            "",
            "| train_fraction | method | lr (LoRA) | seeds | test accuracy, % | per seed | "
            "vs finetune (same fraction), points [95% CI] | best dev step | "
            "train wall, s (mean of runs not resumed) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for fraction in sorted({f for _, f in sbs}, reverse=True):
            for method in ("finetune", "distill", "step_by_step"):
                rs = sorted(sbs.get((method, fraction), []), key=lambda r: r["seed"])
                if not rs:
                    continue
                accs = [r["test"]["accuracy"] for r in rs]
                base_runs = sbs.get(("finetune", fraction))
                diff = fmt_diff(rs, base_runs)[0] if base_runs and method != "finetune" else "-"
                out.append(
                    f"| {fraction:g} | {method} | {rs[0]['settings']['lr']:g} | "
                    f"{','.join(str(r['seed']) for r in rs)} | {mean_sd(accs)} | "
                    f"{', '.join(f'{a:.1f}' for a in accs)} | {diff} | "
                    f"{', '.join(str(r['best']['step']) for r in rs)} | "
                    f"{train_wall(rs)} |"
                )
        out.append("")
        for claim, a, b in (
            (("step_by_step > finetune, full data"), ("step_by_step", 1.0), ("finetune", 1.0)),
            (("step_by_step > distill, full data"), ("step_by_step", 1.0), ("distill", 1.0)),
            (("step_by_step > finetune, 25% data"), ("step_by_step", 0.25), ("finetune", 0.25)),
            (("step_by_step > distill, 25% data"), ("step_by_step", 0.25), ("distill", 0.25)),
            (("step_by_step at 25% data >= finetune at full data"), ("step_by_step", 0.25), ("finetune", 1.0)),
        ):
            if a in sbs and b in sbs:
                _, m, boot = fmt_diff(sbs[a], sbs[b])
                claims.append((claim, m, boot, 1, len(sbs[a]), len(sbs[b])))

    # ExAccErr
    ex: dict[str, list[dict]] = {}
    for name, r in done.items():
        if name.startswith("exacc-"):
            for point in r["points"]:
                ex.setdefault(r["method"], []).append(
                    {**point, **{k: r[k] for k in ("prompts", "samples", "length", "run")}}
                )
    for points in ex.values():
        points.sort(key=lambda u: u["step"])
    if ex:
        stats = {method: [exacc_interval(u) for u in points] for method, points in ex.items()}
        plot_exacc(ex, stats, FIGURE)
        first = next(iter(ex.values()))[0]
        out += [
            f"ExAccErr (teacher used as oracle; {first['prompts']} test prompts x {first['samples']} samples, "
            f"T 1, lengths <= L = {first['length']}, seed-0 students), with a 95% bootstrap interval over prompts:",
            "",
            "| method | step | ExAccErr(L), % [95% CI] | R(L) | E(L) | measure wall, s |",
            "|---|---|---|---|---|---|",
        ]
        widths = []  # of each point's interval
        for method, points in ex.items():
            for u, (v, lo, hi) in zip(points, stats[method]):
                widths.append(hi - lo)
                r, e = np.mean(u["student_error_rows"], 0)[-1], np.mean(u["teacher_error_rows"], 0)[-1]
                out.append(
                    f"| {method} | {u['step']} | {v:.1f} [{lo:.1f}, {hi:.1f}] | {r:.3f} | {e:.3f} | "
                    f"{u['exacc_s']:.0f} |"
                )
        out += ["", f"![ExAccErr]({FIGURE.name})", ""]
        if "promptkd" in ex:
            last = ex["promptkd"][-1]
            for other in ("sft", "kd", "gkd"):
                same = [u for u in ex.get(other, []) if u["step"] == last["step"]]
                if same:
                    v, boot = exacc_boot(last, same[0])
                    claims.append((f"promptkd ExAccErr(L) < {other} (step {last['step']})", v, boot, -1, 1, 1))
        # neighbour spread: how much ExAccErr(L) moves between neighbouring checkpoints of one run
        moves = [abs(exacc_curve(b)[-1] - exacc_curve(a)[-1]) for pts in ex.values() for a, b in zip(pts, pts[1:])]
        # between methods: |ExAccErr(L) of one method - another's| at the same step
        gaps = [
            abs(exacc_curve(a)[-1] - exacc_curve(b)[-1])
            for m1, m2 in itertools.combinations(ex, 2)
            for a in ex[m1]
            for b in ex[m2]
            if a["step"] == b["step"]
        ]
        if moves:
            line = (f"Neighbouring checkpoints of one run differ by {min(moves):.1f}-{max(moves):.1f} points of "
                    f"ExAccErr(L) (median {np.median(moves):.1f})")
            if gaps:
                smaller = np.median(moves) < np.median(gaps)
                line += (f"; methods at the same step differ by {min(gaps):.1f}-{max(gaps):.1f} (median "
                         f"{np.median(gaps):.1f}). The spread between neighbouring checkpoints is "
                         + ("smaller than" if smaller else "**not smaller than**")
                         + " the differences between methods")
                half = np.median(widths) / 2
                line += (f", and each point's 95% interval is +-{half:.0f} points (median half-width): at "
                         f"{first['prompts']} prompts x {first['samples']} samples ExAccErr "
                         + ("may order the methods only where the intervals below say so." if smaller else
                            "does not order these methods or checkpoints."))
            out += [line, ""]
        for name, r in done.items():  # snapshots from a second training of the run (its folder was lost)
            again = r.get("snapshots_retrained") if name.startswith("exacc-") else None
            if again:
                note = f" {again['note']}" if again.get("note") else ""
                out += [f"{name}'s students come from {second_training(r['run'], again)}.{note}", ""]

    if claims:
        family = 0.05 / len(claims)  # Bonferroni: every claim at 1 - 0.05/K, all K at once at >= 95%
        out += [
            "Claims (paired over the 200 test rows; ExAccErr: over the prompts). Each interval covers the "
            "sampling of the test rows (or prompts), not the spread over training seeds (the tables' ± sd); "
            f"the last two columns test all {len(claims)} claims at once (Bonferroni: each at "
            f"{100 * (1 - family):.2f}%), as one of {len(claims)} claims at 95% would hold by chance about "
            f"{len(claims) / 40:.2g} times if no method differed:",
            "",
            f"| claim | verdict | difference, points [95% CI] | seeds (a, b) | verdict, all {len(claims)} claims | "
            f"difference [{100 * (1 - family):.2f}% CI] |",
            "|---|---|---|---|---|---|",
        ]
        for claim, value, boot, direction, na, nb in claims:
            alone, joint = interval(boot), interval(boot, family)
            out.append(
                f"| {claim} | {verdict(*alone, direction)} | {fmt_interval(value, boot)} | {na}, {nb} | "
                f"{verdict(*joint, direction)} | {fmt_interval(value, boot, family)} |"
            )
        out.append("")

    attempts: dict[str, list[str]] = {}
    cpus: dict[str, str] = {}
    log = setup.results / "attempts.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        row = json.loads(line)
        when = []
        if row.get("start") and row.get("end"):
            clock = [time.strftime("%H:%M", time.gmtime(row[k])) for k in ("start", "end")]
            when.append(f"{clock[0]}-{clock[1]} UTC, {(row['end'] - row['start']) / 60:.0f} min")
        if row.get("note"):
            when.append(row["note"])
        note = f" ({'; '.join(when)})" if when else ""
        attempts.setdefault(row["unit"], []).append(f"{row['exit']}{note}")
        if row.get("cpu"):
            cpus[row["unit"]] = row["cpu"]  # the last attempt's: the one that finished
    out += [
        "Every unit of the plan (`python bench/real_pair_evidence.py --status`; attempts: exit status of each "
        "process started for it, -9 = killed, most likely for memory; its clock times when recorded; a unit's "
        "wall counts its last attempt only, so a resumed unit's cost is the sum of its attempts; CPU: the "
        "machine's CPU changed once, so walls on different CPUs do not compare):",
        "",
        "| unit | state | wall, s | CPU | attempts |",
        "|---|---|---|---|---|",
    ]
    for name, state in states.items():
        wall = f"{done[name]['wall_s']:.0f}" if name in done and "wall_s" in done[name] else ""
        tried = "; ".join(attempts.get(name, []))
        cpu = done[name].get("cpu") if name in done else None
        out.append(f"| {name} | {state} | {wall} | {cpu or cpus.get(name, '')} | {tried} |")
    out.append("")
    out.append("Raw: bench/results/real_pair_evidence/*.json (one per finished unit; ExAccErr per checkpoint).")
    return "\n".join(out)


def progress_line(finished: int, total: int) -> str:
    if finished == total:
        return f"All {total} units of the plan finished."
    return f"**PARTIAL: {finished} of {total} units finished**; the tables hold only the finished ones."


def write_report(setup, specs: dict, states: dict) -> None:
    body = section(setup, specs, states)
    heading, rest = body.split("\n", 1)
    block = f"{heading}\n\n{SECTION_BEGIN}\n{rest.strip()}\n{SECTION_END}\n"
    text = DOCS.read_text()  # read right before writing: other sessions edit this file
    if SECTION_BEGIN in text:
        start = text.rindex("\n## ", 0, text.index(SECTION_BEGIN)) + 1  # the heading line before the marker
        end = text.index(SECTION_END) + len(SECTION_END) + 1
        text = text[:start] + block + text[end:]
    else:
        anchor = text.index("## Qwen2.5-Coder 0.5B from 1.5B on SVAMP")
        text = text[:anchor] + block + "\n" + text[anchor:]
    DOCS.write_text(text)
    print(body)
    print(f"\nwrote {DOCS}" + (f" and {FIGURE}" if FIGURE.exists() else ""))
