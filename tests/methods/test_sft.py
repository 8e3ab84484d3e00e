import json

import torch

from lmdistill.methods import load_config
from lmdistill.losses import cross_entropy
from lmdistill.forward import response_logits
from lmdistill.trainer import Trainer


def test_sft_lowers_cross_entropy_on_a_fixed_batch(tiny_llama_student, instruct_file, tmp_path):
    config = load_config(None, ["method=sft", f"student={tiny_llama_student}", f"train_data={instruct_file}",
                                f"output_dir={tmp_path / 'run'}", "steps=3", "batch_size=2", "lr=3e-3",
                                "prompt_format=alpaca", "progress=false", "lr_schedule=constant"])
    trainer = Trainer(config)
    batch = trainer.micro_batches()[0]
    labels, mask = batch.targets()

    def nll():
        with torch.no_grad():
            return cross_entropy(response_logits(trainer.method.student, batch), labels, mask).item()

    before = nll()
    for _ in range(5):
        trainer.update("student", [batch])
    assert nll() < before - 0.1


def test_sft_run_writes_metrics_config_and_hf_student(tiny_llama_student, instruct_file, tmp_path):
    config = load_config(None, ["method=sft", f"student={tiny_llama_student}", f"train_data={instruct_file}",
                                f"output_dir={tmp_path / 'run'}", "steps=2", "batch_size=2", "grad_accum=2",
                                "prompt_format=alpaca", "progress=false"])
    run = Trainer(config).train()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["tokens"] > 0 and r["loss"] > 0 for r in rows)
    assert "method: sft" in (run / "config.yaml").read_text()
    assert (run / "student" / "config.json").exists() and (run / "student" / "tokenizer_config.json").exists()
    assert list((run / "tensorboard").iterdir())
