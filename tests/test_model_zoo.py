"""The model zoo: an alias installs once, offline, and resolves to its cached folder."""

import pytest

from lmdistill.model_zoo import resolve_model
from lmdistill.models import load_model


@pytest.mark.slow
def test_smollm2_alias_converts_once_to_a_cached_safetensors_folder(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    # Use the shared cache so the conversion is done once per machine, not once per test run.
    folder = Path(resolve_model("smollm2-135m-instruct"))
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    mtime = os.path.getmtime(folder / "model.safetensors")
    assert Path(resolve_model("smollm2-135m-instruct")) == folder
    assert os.path.getmtime(folder / "model.safetensors") == mtime  # not converted again
    model = load_model("smollm2-135m-instruct")
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
