"""Two CPU processes under ``accelerate launch`` (DDP over gloo) stay in sync.

accelerate 1.x sends ``--cpu`` to its single-process launcher, so the two CPU processes are started
by its torchrun launcher (``--multi_gpu``); with no CUDA device the training code asks Accelerate
for CPU processes, which then join a gloo process group.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from scmmgpt.train.loop import latest_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_launch_keeps_ranks_in_sync(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(worker), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["before"] == ranks[1]["before"]
    assert ranks[0]["after"] == ranks[1]["after"], "DDP ranks diverged"
    assert ranks[0]["after"] != ranks[0]["before"], "no training happened"
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    # each rank computed its loss on its own shard of the batch: the logged losses differ
    assert ranks[0]["loss"] != ranks[1]["loss"]
    # only the main process wrote the checkpoint, complete
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"
