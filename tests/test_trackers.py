"""`report_to`: the metrics reach TensorBoard (the default), W&B in offline mode and MLflow's
local file store, through Accelerate's trackers, equal to metrics.jsonl."""

import json
import struct

import pytest

from kd_testing import make_trainer, metrics


def wandb_history(path) -> list[dict]:
    """The history rows of an offline W&B run file (`run-*.wandb`: a LevelDB-style log of
    protobuf `Record`s in 32 KiB blocks, 7-byte file and record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, chunks = [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            records.append(b"".join(chunks))
            chunks = []
    rows = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_wandb_offline_and_mlflow_file_store_record_the_loss_and_the_config(tiny_llama, tiny_llama_student,
                                                                             instruct_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    make_trainer("kd", tiny_llama, tiny_llama_student, instruct_file, run, precision="fp32", steps=3,
                 report_to="[tensorboard,wandb,mlflow]", tracker_project="lmdistill-test").train()
    losses = [row["loss"] for row in metrics(run)]
    assert len(losses) == 3

    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    history = wandb_history(wandb_file)
    assert [h["train/loss"] for h in history] == pytest.approx(losses, rel=1e-6)
    assert [h["_step"] for h in history] == [1, 2, 3]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "lmdistill-test"]
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    logged = client.get_metric_history(mlflow_run.info.run_id, "train/loss")
    assert [m.value for m in sorted(logged, key=lambda m: m.step)] == pytest.approx(losses, rel=1e-6)
    assert mlflow_run.data.params["method"] == "kd" and mlflow_run.data.params["kd_ratio"] == "0.5"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)


def test_report_to_none_writes_only_metrics_jsonl(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    run = tmp_path / "run"
    make_trainer("sft", tiny_llama, tiny_llama_student, instruct_file, run, steps=2, report_to="[none]").train()
    assert len(metrics(run)) == 2 and not (run / "tensorboard").exists()
    from lmdistill.config import ConfigError

    with pytest.raises(ConfigError, match="config key 'report_to'"):
        make_trainer("sft", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "x", report_to="[comet]")
