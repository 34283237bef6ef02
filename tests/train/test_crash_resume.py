"""Crash safety (issue 8): a training process killed with SIGKILL mid-run, resumed with
``--resume``, ends with exactly the weights of an uninterrupted run (CPU, fixed seed), and the
metrics log holds each step once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from scmmgpt.train.loop import latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 8, 2
ARGS = ["--config", "cpu-small", "--set", "train.progress=false", "--set", "train.val_every=null",
        "--set", "train.deterministic=true", "--set", f"train.max_steps={STEPS}", "--set",
        f"train.save_every={SAVE_EVERY}", "--set", "train.log_every=1", "--set", "train.batch_size=8",
        "--set", "model.max_genes=64"]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "scmmgpt.cli.main", "pretrain", "--stage", "1", "--out", str(out), *ARGS, *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    from scmmgpt.cli.main import main

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert main(_cmd(straight)[3:]) == 0                     # uninterrupted, in this process

    proc = subprocess.Popen(_cmd(crashed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (crashed / f"checkpoint-{SAVE_EVERY}").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (crashed / "model" / "manifest.json").exists()
    killed_at = latest_checkpoint(crashed)
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < STEPS

    resumed = subprocess.run(_cmd(crashed, "--resume"), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["steps"] == STEPS

    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(crashed / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert diff == 0.0, f"resumed weights differ from the uninterrupted run by {diff}"
    # the killed run's records after its checkpoint were dropped and redone: each step once
    steps = [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), steps
    # a checkpoint the kill cut short was rewritten by the resumed run
    assert not list(crashed.glob(".tmp-checkpoint-*"))
    assert latest_checkpoint(crashed).name == f"checkpoint-{STEPS}"
