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


def test_a_chunked_alias_builds_into_a_cache_folder_that_does_not_exist_yet(tmp_path, monkeypatch):
    """A fresh machine has no ~/.cache/lmdistill: `make real-models` failed there with
    FileNotFoundError from its staging folder. Here the one piece is not the recorded model, so
    the build stops at the checksum, after the staging folder is made."""
    import sys

    from lmdistill import model_zoo
    from lmdistill.model_zoo import ModelError

    package = tmp_path / "packages" / "fake_pair_part1"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "part1.bin").write_bytes(b"not a gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "packages"))
    monkeypatch.delitem(sys.modules, "fake_pair_part1", raising=False)
    cache = tmp_path / "fresh" / "cache"
    monkeypatch.setenv("LMDISTILL_CACHE", str(cache))
    fake = model_zoo.ChunkedGGUF("fake_pair", "fake-pair", "0.1", 1, 10, "0" * 64)
    monkeypatch.setitem(model_zoo.CHUNKED_MODELS, "fake-pair", fake)
    with pytest.raises(ModelError, match="is not the recorded one"):
        resolve_model("fake-pair")
    assert cache.is_dir() and not any(cache.iterdir())  # the staging folder is removed
