"""Child process for the subprocess tests (resume after SIGKILL, multi-process runs),
and the tiny recipes those tests share.

    python tests/run_training.py RECIPE.yaml [key=value ...] [-- RECIPE.yaml [key=value ...]]

Runs `lmdistill train` once per `--`-separated recipe, in order, in this one process,
with a fixed thread count (LMDISTILL_TEST_THREADS, default 1) so that runs are
bit-reproducible. Test hooks (environment):

  LMDISTILL_TEST_STALL_AT_STEP=N       in the LAST run, once N steps are done, write
                                       `<output_dir>/STALLED` and wait to be killed.
  LMDISTILL_TEST_KILL_IN_CHECKPOINT=N  in the LAST run, SIGKILL this process while it writes
                                       checkpoint N (student on disk, trainer state not yet).
  LMDISTILL_TEST_DIGEST=PREFIX         after run i, every rank writes `PREFIX.run<i>.rank<r>.json`:
                                       the sum of each student parameter as this rank holds it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

HOOKS: dict = {"stall_at": None, "kill_at": None, "sums": {}}

# ----- tiny recipes (used by the tests; paths filled in by `recipe`) -----

COMMON = {
    "precision": "fp32",
    "prompt_format": "alpaca",
    "max_prompt_length": 128,
    "max_length": 160,
    "steps": 6,
    "batch_size": 2,
    "grad_accum": 2,
    "lr": 1.0e-3,
    "warmup_steps": 1,
    "save_every": 2,
    "keep_checkpoints": 2,
    "progress": False,
}
EXTRA = {
    "sft": {},
    "promptkd": {"prompt_len": 2, "prompt_lr": 1.0e-2},
    "gkd": {"lmbda": 0.5, "beta": 0.5},
    # DistiLLM's own state moves within a few steps: with tau 0.8 most micro-batches are
    # student samples, the buffer (capacity 2) fills and is replayed, validation every 2 steps.
    "distillm": {
        "init_threshold": 0.8,
        "threshold_step": 0.1,
        "loss_eps": 0.0,
        "capacity": 2,
        "valid_every": 2,
        "valid_examples": 4,
    },
    "step_by_step": {"max_target_length": 24, "max_length": 192},
}


def recipe(
    method: str, folder: Path, teacher: Path, student: Path, instruct_file: Path, data_dir: Path, **overrides
) -> Path:
    """Write a tiny recipe for `method` to `folder/<method>.yaml` and return its path."""
    from lmdistill.config import config_fields
    from lmdistill.methods import METHODS

    # Every method gets the teacher (those without one ignore it); reasoning methods get SVAMP.
    values = {
        "method": method,
        "student": str(student),
        "teacher": str(teacher),
        **COMMON,
        **EXTRA.get(method, {}),
        **overrides,
    }
    fields = config_fields(METHODS[method].config_class)
    if "max_new_tokens" in fields:  # methods that generate during training: short responses
        values.setdefault("max_new_tokens", 8)
    else:
        values.pop("max_new_tokens", None)
    reasoning = "dataset" in fields
    values["train_data"] = str(data_dir / "step_by_step" / "svamp") if reasoning else str(instruct_file)
    if reasoning:
        values.setdefault("max_target_length", 24)
    path = folder / f"{method}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMDISTILL_TEST_")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(extra)
    return env


def run_child(args: list[str], log_file: Path, timeout: float = 600, **env: str) -> int:
    """Run this script with `args` to completion; its output goes to `log_file`."""
    with open(log_file, "ab") as log:
        return subprocess.run(
            [sys.executable, str(Path(__file__)), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(**env),
            timeout=timeout,
        ).returncode


def run_child_until(args: list[str], log_file: Path, marker: Path | None, timeout: float = 600, **env: str) -> int:
    """Run this script; once `marker` exists, SIGKILL it (marker None: wait for it to end)."""
    with open(log_file, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__)), *args], stdout=log, stderr=subprocess.STDOUT, env=child_env(**env)
        )
        deadline = time.monotonic() + timeout
        try:
            while child.poll() is None and time.monotonic() < deadline:
                if marker is not None and marker.exists():
                    child.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.05)
            return child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


def launch_two_processes(args: list[str], log_file: Path, timeout: float = 600, **env: str) -> int:
    """Run this script as two CPU processes under `accelerate launch` (gloo).

    `accelerate launch --cpu --num_processes 2` starts ONE process unless MPI is set up
    (accelerate 1.x's CPU launcher is mpirun); `--multi_gpu` with ACCELERATE_USE_CPU=1
    starts two through torch.distributed.run, and Accelerate then picks MULTI_CPU + gloo.
    """
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(Path(__file__)),
        *args,
    ]
    with open(log_file, "ab") as log:
        return subprocess.run(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            env=child_env(ACCELERATE_USE_CPU="1", **env),
        ).returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- the child process -----


def _install_hooks() -> None:
    from lmdistill import checkpoint, trainer

    original_step = trainer.Trainer.train_step
    original_save_state = checkpoint.save_state
    original_save_final = trainer.Trainer.save_final

    def train_step(self):
        if HOOKS["stall_at"] is not None and self.step == HOOKS["stall_at"]:
            (self.run_dir / "STALLED").write_text(str(self.step))
            while True:  # the test SIGKILLs us here
                time.sleep(0.05)
        return original_step(self)

    def save_state(state, folder, name="state"):
        if HOOKS["kill_at"] is not None and state.get("step") == HOOKS["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return original_save_state(state, folder, name)

    def save_final(self):
        HOOKS["sums"] = {
            n: float(p.detach().double().sum()) for n, p in self.method.unwrapped_student.named_parameters()
        }
        return original_save_final(self)

    trainer.Trainer.train_step = train_step
    checkpoint.save_state = save_state
    trainer.Trainer.save_final = save_final


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(int(os.environ.get("LMDISTILL_TEST_THREADS", "1")))
    from lmdistill import cli

    runs: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--":
            runs.append([])
        else:
            runs[-1].append(arg)
    _install_hooks()
    digest = os.environ.get("LMDISTILL_TEST_DIGEST")
    for i, run in enumerate(runs):
        last = i == len(runs) - 1
        for key, env in (
            ("stall_at", "LMDISTILL_TEST_STALL_AT_STEP"),
            ("kill_at", "LMDISTILL_TEST_KILL_IN_CHECKPOINT"),
        ):
            HOOKS[key] = int(os.environ[env]) if last and os.environ.get(env) else None
        code = cli.main(["train", *run])
        if code:
            return code
        if digest:
            from accelerate import PartialState

            rank = PartialState().process_index
            Path(f"{digest}.run{i}.rank{rank}.json").write_text(json.dumps(HOOKS["sums"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
