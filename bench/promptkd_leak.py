"""How large was PromptKD's gradient leak? The old prompt update (the student's output layer not
detached) put a forward-KL gradient into the student's tied embeddings, which the next student
step then applied. This compares that gradient with the student update's own on one batch of
samples from a tiny random-weight Llama pair.  Run: .venv/bin/python bench/promptkd_leak.py
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import DATA_DIR, make_tiny_llama  # noqa: E402

import lmdistill.methods.promptkd as promptkd  # noqa: E402
from lmdistill.methods import load_config  # noqa: E402
from lmdistill.trainer import Trainer  # noqa: E402


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    teacher, student = make_tiny_llama(folder / "t", layers=4), make_tiny_llama(folder / "s", layers=2, seed=1)
    rows = [json.loads(line) for line in open(DATA_DIR / "instruct/dolly/dev.jsonl")][:16]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = Trainer(load_config(None, [
        "method=promptkd", f"student={student}", f"teacher={teacher}", f"train_data={folder / 'train.jsonl'}",
        f"output_dir={folder / 'run'}", "batch_size=2", "max_new_tokens=12", "prompt_format=alpaca",
        "progress=false", "precision=fp32"]))
    method = trainer.method
    torch.manual_seed(0)
    samples = method.prepare(trainer.micro_batches()[0], 0)
    embeddings = method.unwrapped_student.get_input_embeddings().weight
    promptkd.fixed = lambda head: head  # the code path before the fix
    method.prompt_loss(samples, 0)[0].backward()
    leak, embeddings.grad = embeddings.grad.clone(), None
    method.student_loss(samples, 0)[0].backward()
    own = embeddings.grad
    print(f"leaked / own gradient norm on the tied embeddings: {leak.norm():.4g} / {own.norm():.4g} "
          f"= {leak.norm() / own.norm():.3f}; cosine {torch.cosine_similarity(leak.flatten(), own.flatten(), 0):.3f}")


if __name__ == "__main__":
    main()
