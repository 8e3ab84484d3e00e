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


def test_a_tracker_failing_during_the_run_is_a_warning_and_training_goes_on(tiny_llama, tiny_llama_student,
                                                                            instruct_file, tmp_path, monkeypatch,
                                                                            caplog):
    """The MLflow store removed after step 2: a warning, steps 3 and 4 train and reach metrics.jsonl."""
    import logging
    import shutil

    from lmdistill.trainer import Trainer

    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    real_step = Trainer.train_step

    def train_step(self):
        if self.step == 2:
            shutil.rmtree(run / "mlruns")
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with caplog.at_level(logging.WARNING, logger="lmdistill"):
        make_trainer("sft", tiny_llama, tiny_llama_student, instruct_file, run, steps=4, report_to="[mlflow]").train()
    assert [row["step"] for row in metrics(run)] == [1, 2, 3, 4]
    warnings = [r.getMessage() for r in caplog.records if "tracker" in r.getMessage()]
    assert len(warnings) == 1 and "step 3" in warnings[0] and "metrics.jsonl" in warnings[0], warnings
    assert (run / "student" / "model.safetensors").exists()


def test_an_mlflow_server_that_does_not_answer_stops_the_start_at_once_with_an_error_line(
        tiny_llama_student, instruct_file, tmp_path, monkeypatch, capsys):
    import time

    import yaml

    from lmdistill import cli
    from run_training import free_port

    pytest.importorskip("mlflow")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "sft", "student": str(tiny_llama_student), "progress": False,
                                      "train_data": str(instruct_file), "prompt_format": "alpaca", "steps": 1,
                                      "batch_size": 1, "report_to": ["mlflow"], "output_dir": str(tmp_path / "run")}))
    started = time.monotonic()
    code = cli.main(["train", str(recipe)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not any("Traceback" in line for line in err), err
    (line,) = [line for line in err if line.startswith("lmdistill train: error: ")]
    assert "mlflow" in line and url in line and "report_to" in line
    assert time.monotonic() - started < 30
