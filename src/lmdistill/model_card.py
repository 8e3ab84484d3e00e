"""Model cards: every saved student (`student/`, `best/`) and adapter (`student_adapter/`) gets
a README.md in the Hub's model-card format, YAML metadata between `---` lines, then Markdown:

    ---
    base_model: HuggingFaceTB/SmolLM2-135M-Instruct
    library_name: transformers          # peft for an adapter
    license: apache-2.0                 # the student's (else the teacher's), where known
    tags: [distillation, gkd, lmdistill]
    datasets: [databricks/databricks-dolly-15k]   # Hub ids only
    pipeline_tag: text-generation
    ---
    # the method, teacher, data, budget, evaluation figures and the recipe

`lmdistill push RUN_DIR REPO_ID` uploads the student (or adapter) folder with its card.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import yaml

from lmdistill.config import config_to_dict, expand_path
from lmdistill.data import DataError
from lmdistill.methods import method_class
from lmdistill.model_zoo import KNOWN_MODELS

def _front_matter(path: Path) -> dict:
    """The YAML metadata of an existing model card, {} when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    try:
        return (yaml.safe_load(match.group(1)) or {}) if match else {}
    except yaml.YAMLError:
        return {}


def model_identity(spec: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(Hub id, license) of a model spec where known: an alias, a Hub id, or a local folder whose
    own card says (`base_model`/`license`); a local path without one has no Hub id."""
    if not spec:
        return None, None
    if spec.lower() in KNOWN_MODELS:
        return KNOWN_MODELS[spec.lower()]
    folder = Path(expand_path(spec))
    if folder.is_dir():
        meta = _front_matter(folder / "README.md")
        base = meta.get("base_model")
        return (base[0] if isinstance(base, list) and base else base), meta.get("license")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec, None
    return None, None


def _dataset_id(train_data: str) -> Optional[str]:
    path = Path(expand_path(train_data))
    return None if path.exists() or train_data.count("/") != 1 else train_data


def _result_cells(results: dict) -> list[str]:
    """The figures of a results file as `lmdistill eval --out` writes it: ROUGE-L per dataset
    ({dataset: {rougeL_mean, rougeL_std, rougeL_per_seed, ...}}), or a reasoning task's accuracy
    ({dataset, split, accuracy, ...})."""
    if "accuracy" in results:
        return [f"{results['dataset']} {results.get('split', '')}: accuracy {results['accuracy']:.2f}"]
    cells = []
    for name, r in results.items():
        if isinstance(r, dict) and "rougeL_mean" in r:
            spread = f" ± {r['rougeL_std']:.2f}" if len(r.get("rougeL_per_seed") or []) > 1 else ""
            cells.append(f"{name}: ROUGE-L {r['rougeL_mean']:.2f}{spread}")
    return cells


def _evaluations(run_dir: Path) -> list[str]:
    """Markdown lines with the run's evaluation figures: dev evaluations from metrics.jsonl,
    the best checkpoint, and results files (`lmdistill eval --out RUN_DIR/eval*.json`)."""
    lines = []
    rows = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    dev = [(r["step"], k, v) for r in rows for k, v in r.items() if k.startswith("dev_")]
    if dev:
        lines += ["| step | dev metric | value |", "|---|---|---|"]
        lines += [f"| {step} | {name[4:]} | {value:.4f} |" for step, name, value in dev]
    best = run_dir / "best" / "best.json"
    if best.exists():
        b = json.loads(best.read_text())
        lines.append(f"\nBest dev checkpoint (`best/`): step {b['step']}, {b['metric']} {b['value']:.4f}.")
    for path in sorted(run_dir.glob("eval*.json")):
        try:
            cells = _result_cells(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            continue
        if cells:
            lines.append(f"\n`{path.name}`: " + ", ".join(cells))
    for path in sorted(run_dir.glob("draft_eval*.json")):  # `lmdistill draft-eval --out RUN_DIR/draft_eval.json`
        try:
            d = json.loads(path.read_text())
            line = (f"\nAs a speculative-decoding draft for `{d['target']}` (`{path.name}`): token acceptance rate "
                    f"alpha {d['alpha']:.4f} (temperature {d['temperature']:g}, greedy agreement "
                    f"{d['alpha_greedy']:.4f}, "
                    f"{d['positions']} positions of `{d['data']}`); expected tokens per target call "
                    + ", ".join(f"{v:.2f} (gamma {g})" for g, v in d["expected_tokens_per_call"].items()))
            line += "".join(f"; measured {m['mode']}: x{m['speedup']:.2f} wall-clock, acceptance "
                            f"{m['observed_acceptance']:.3f}" for m in d.get("measured", []))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        lines.append(line + ".")
    train = [r for r in rows if "tokens" in r]
    if train:
        last = train[-1]
        shown = {k: v for k, v in last.items() if k not in ("step", "tokens", "tokens_per_s", "peak_rss_mb")
                 and not k.startswith(("lr_", "dev_"))}
        lines.append(f"\nLast training step ({last['step']}): " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    return lines


def model_card(config, run_dir: Path, adapter: bool = False, parameters: Optional[dict] = None) -> str:
    """The README.md of a run's saved student (or, `adapter`, its LoRA adapter)."""
    student_id, student_license = model_identity(config.student)
    teacher_id, teacher_license = model_identity(config.teacher)
    dataset = _dataset_id(config.train_data)
    meta = {
        "base_model": student_id,
        "library_name": "peft" if adapter else "transformers",
        "license": student_license or teacher_license,
        "tags": ["distillation", config.method, "lmdistill"] + (["lora"] if config.student_lora else []),
        "datasets": [dataset] if dataset else None,
        "pipeline_tag": "text-generation",
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    method = method_class(config.method).description or config.method
    if getattr(config, "divergence", "forward_kl") != "forward_kl":  # kd with tvd or reverse_kl in place of the KL
        method += f", with divergence `{config.divergence}` in place of the forward KL"
    teacher = config.teacher or "none"
    budget = (f"{config.steps} optimiser steps of {config.batch_size} x {config.grad_accum} examples per process, "
              f"lr {config.lr:g} ({config.lr_schedule}), {config.precision}")
    body = [
        f"# {run_dir.name}: a {config.method} student" + (" (LoRA adapter)" if adapter else ""),
        "",
        f"Distilled with lmdistill by **{config.method}**: {method}.",
        "",
        f"- **Teacher:** `{teacher}`" + (f" ({teacher_id})" if teacher_id and teacher_id != teacher else ""),
        f"- **Student (base):** `{config.student}`"
        + (f" ({student_id})" if student_id and student_id != config.student else ""),
        f"- **Data:** `{config.train_data}`" + (f", split {config.split}" if config.split != "train" else ""),
        f"- **Budget:** {budget}",
    ]
    if config.student_lora is not None:
        lora = config.student_lora
        body.append(f"- **LoRA:** r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, "
                    f"modules {', '.join(lora.target_modules)}")
    if parameters:
        body.append(f"- **Trained parameters:** {parameters['trainable']:,} of {parameters['total']:,}")
    evaluation = _evaluations(run_dir)
    body += ["", "## Evaluation", ""] + (evaluation or ["No evaluation ran during training."])
    # repr: a Python string literal whatever quotes or backslashes the folder name holds
    if adapter:
        usage = (f"from peft import AutoPeftModelForCausalLM\n\n"
                 f"model = AutoPeftModelForCausalLM.from_pretrained({run_dir.name + '/student_adapter'!r})")
    else:
        folder = repr(run_dir.name + "/student")
        usage = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                 f"model = AutoModelForCausalLM.from_pretrained({folder})\n"
                 f"tokenizer = AutoTokenizer.from_pretrained({folder})")
    recipe = yaml.safe_dump(config_to_dict(config), sort_keys=False).strip()
    body += ["", "## Usage", "", "```python", usage, "```", "", "## Recipe", "", "```yaml", recipe, "```", ""]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + "\n".join(body)


def refresh_cards(run_dir: str | Path) -> list[Path]:
    """Rewrite the model card of each saved student folder of a run (student/, best/, student_adapter/), so
    that figures written into the run folder since (eval*.json, draft_eval*.json) show; the cards written."""
    from lmdistill.methods import load_config

    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    parameters = run_dir / "parameters.json"
    counts = json.loads(parameters.read_text()) if parameters.exists() else None
    written = []
    for name, adapter in (("student", False), ("best", False), ("student_adapter", True)):
        card = run_dir / name / "README.md"
        if card.exists():
            card.write_text(model_card(config, run_dir, adapter, counts), encoding="utf-8")
            written.append(card)
    return written


def push(run_dir: str | Path, repo_id: str, adapter: bool = False, private: bool = False, api=None) -> str:
    """Upload a run's student (or `adapter`) folder to the Hub repo `repo_id`, its model card
    rewritten first (so evaluations added since, `RUN_DIR/eval*.json`, are in it); returns the
    commit URL. The token comes from `huggingface_hub`'s usual places (HF_TOKEN, `hf auth login`)."""
    from lmdistill.lora import is_adapter_folder
    from lmdistill.methods import load_config

    if api is None:  # a real upload: the id, the token and the Hub are checked before anything else
        api = hub_api(repo_id)
    run_dir = Path(run_dir)
    folder = run_dir / ("student_adapter" if adapter else "student")
    if not (folder / "config.json").is_file() and not is_adapter_folder(folder):
        raise DataError(f"{folder}: no saved {'adapter' if adapter else 'student'}; folders in the run: "
                                f"{', '.join(sorted(p.name for p in run_dir.iterdir()))}")
    config = load_config(run_dir / "config.yaml")
    parameters = run_dir / "parameters.json"
    counts = json.loads(parameters.read_text()) if parameters.exists() else None
    (folder / "README.md").write_text(model_card(config, run_dir, adapter, counts), encoding="utf-8")
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                               commit_message=f"lmdistill: {run_dir.name}")
    return str(getattr(commit, "commit_url", commit))


def hub_api(repo_id: str):
    """An `HfApi` for uploading to `repo_id`, once the id is valid, a token is found (HF_TOKEN,
    `hf auth login`) and the Hub accepts it; DataError naming what is wrong otherwise."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from lmdistill.instruct.data import hub_unreachable

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise DataError(f"repo id {repo_id!r}: {e}") from None
    token = get_token()
    if not token:
        raise DataError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (with write access) before "
                        f"pushing to {repo_id}")
    problem = hub_unreachable()
    if problem:
        raise DataError(f"the Hugging Face Hub cannot be reached ({problem}); nothing was uploaded")
    api = HfApi(token=token)
    try:
        api.whoami()
    except Exception as e:  # e.g. 401: the token is not accepted
        raise DataError(f"the Hub does not accept the token ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); nothing was uploaded") from None
    return api
