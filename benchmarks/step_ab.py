"""Seconds per ``cpu-small`` training step with one library path switched off, then on, alternating.

Each arm runs in a fresh process (the same seeds, cells and batches): the demo's cells
(``pbmc68k_reduced``, the demo's split), stage 1 at batch 32 or stage 2 at batch 8, 3 warm-up steps,
then ``--reps`` timings of ``--steps`` steps each. Rounds alternate ``off``, ``on``, so that a
machine's drift falls on both arms. The switches:

* ``fold``: the Q-Former's folded cross-attention (:meth:`~scmmgpt.modules.qformer.Attention.folds`);
  off, keys and values are projected;
* ``cdgen_rows``: CDGen's vocabulary head on the labelled rows alone; off, ``logits_to_keep``;
* ``ctm``: stage 1 with its matching loss (CTM, paper eq. 3); off, CTC alone (``train.losses=[ctc]``);
* ``malloc``: on, glibc's allocator keeps large blocks (``MALLOC_MMAP_THRESHOLD_`` and
  ``MALLOC_TRIM_THRESHOLD_`` of 10^9 in the worker's environment, read before Python starts); off,
  its defaults, which hand every block above 32 MB back to the kernel when freed.

A step's time is a figure of this machine only; compare the arms of one run.

    python benchmarks/step_ab.py --stage stage1 --switch fold
    python benchmarks/step_ab.py --stage stage2 --switch cdgen_rows
    python benchmarks/step_ab.py --stage stage1 --switch ctm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWITCHES = ("fold", "cdgen_rows", "ctm", "malloc")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}


def _switch_off(name: str) -> None:
    if name == "fold":
        from scmmgpt.modules.qformer import Attention

        Attention.folds = lambda self, kv: False          # type: ignore[method-assign]
    elif name == "cdgen_rows":
        from scmmgpt.models import network

        network._decoder_and_head = lambda lm: None


def worker(stage: str, switch: str, off: bool, steps: int, reps: int) -> list[float]:
    """Seconds per step of ``reps`` timings, in this process."""
    import numpy as np
    import torch

    from scmmgpt.data.labelled import DataConfig, load_labelled
    from scmmgpt.models.scmmgpt import ScMMGPT
    from scmmgpt.models.stages import stage_spec
    from scmmgpt.train.run import load_run_config

    if off:
        _switch_off(switch)
    rc = load_run_config("cpu-small", ["train.seed=0"])
    lab = load_labelled(DataConfig(path=None, label_key="cell_type", split=(0.7, 0.1, 0.2), seed=0),
                        target_sum=rc.model.target_sum)
    torch.manual_seed(0)
    model = ScMMGPT.build(rc.model, lab.vocab, with_lm=stage == "stage2")
    net = model.net
    spec = net.set_trainable(stage_spec(stage, ["ctc"] if off and switch == "ctm" else None))
    net.train()
    ds = lab.dataset("train", with_targets=stage == "stage2", **model.reading)
    batch_size = 32 if stage == "stage1" else 8
    collate = model.collator()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5, fused=True)
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)

    def step() -> None:
        batch = collate([ds[int(j)] for j in rng.choice(len(ds), batch_size, replace=False)])
        net(batch, spec, None, gen).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        out.append((time.perf_counter() - t) / steps)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=["stage1", "stage2"], required=True)
    p.add_argument("--switch", choices=SWITCHES, required=True)
    p.add_argument("--rounds", type=int, default=3, help="off/on pairs")
    p.add_argument("--steps", type=int, default=8, help="steps per timing")
    p.add_argument("--reps", type=int, default=2, help="timings per arm and round")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/step_ab/STAGE_SWITCH.json)")
    p.add_argument("--worker", choices=["off", "on"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.switch == "ctm" and args.stage != "stage1":
        p.error("--switch ctm times the alignment stage: use --stage stage1")
    if args.worker:
        off = args.worker == "off" and args.switch != "malloc"        # malloc: set in the environment, below
        print(json.dumps(worker(args.stage, args.switch, off, args.steps, args.reps)))
        return {}
    t0 = time.perf_counter()
    arms: dict[str, list[list[float]]] = {"off": [], "on": []}
    for r in range(args.rounds):
        for arm in ("off", "on"):
            cmd = [sys.executable, __file__, "--stage", args.stage, "--switch", args.switch, "--steps", str(args.steps),
                   "--reps", str(args.reps), "--worker", arm]
            env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
            if args.switch == "malloc" and arm == "on":
                env.update(MALLOC_ENV)
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
            arms[arm].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {args.switch} {arm}: " + " ".join(f"{s:.3f}" for s in arms[arm][-1]) + " s/step",
                  flush=True)
    from scmmgpt.tasks.benchmark import machine_info

    flat = {a: [s for rnd in v for s in rnd] for a, v in arms.items()}
    record = {"benchmark": "step_ab", "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
              "stage": args.stage, "switch": args.switch, "seconds_per_step": arms,
              "range": {a: [min(v), max(v)] for a, v in flat.items()},
              "median": {a: sorted(v)[len(v) // 2] for a, v in flat.items()},
              "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.out or ROOT / "benchmarks" / "results" / "step_ab" / f"{args.stage}_{args.switch}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"{args.switch} off {record['range']['off'][0]:.3f}-{record['range']['off'][1]:.3f} s/step, "
          f"on {record['range']['on'][0]:.3f}-{record['range']['on'][1]:.3f}; written to {out}")
    return record


if __name__ == "__main__":
    main()
