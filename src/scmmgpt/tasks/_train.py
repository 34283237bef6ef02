"""The two-stage schedule shared by the demo and the generative benchmarks: stage 1 (CTC + CTM)
then stage 2 (text-to-cell warm-up, then CDGen + PCGen) on one model object."""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["train_two_stages"]


def train_two_stages(model, lab, rc, *, stage1_steps: int, stage2_steps: int, stage2_batch: int,
                     t2c_warmup_steps: int, t2c_final_steps: int = 0, progress: bool = False, out_dir: str | Path | None = None,
                     validate: bool = True) -> tuple[dict, dict]:
    """Train ``model`` (built with its LM) on ``lab``'s training cells; returns ``fit``'s two results
    (each with ``seconds``).

    ``rc``: the run configuration (``cpu-small`` style) whose ``train`` section sets the optimiser;
    stage 2 uses ``lr_new=2e-3`` for LoRA and the projector and a tenth of its steps as warm-up.
    With ``out_dir``, checkpoints go to ``{out_dir}/train-stage1`` and ``train-stage2``.
    """
    from ..train.loop import fit

    cfg1 = type(rc.train).from_dict(rc.train.to_dict())
    cfg1.stage, cfg1.max_steps, cfg1.progress, cfg1.val_every = "stage1", stage1_steps, progress, None
    cfg1.warmup_steps = min(cfg1.warmup_steps, max(1, stage1_steps // 6))
    cfg1.out_dir = None if out_dir is None else str(Path(out_dir) / "train-stage1")
    val1 = lab.dataset("val", **model.reading) if validate and len(lab.split["val"]) else None
    t0 = time.perf_counter()
    r1 = fit(model, lab.dataset("train", **model.reading), cfg1, val=val1,
             val_labels=lab.types("val") if val1 is not None else None, label_terms=lab.label_set(),
             measured="by_source", train_types=lab.types("train"))
    r1["seconds"] = time.perf_counter() - t0
    cfg2 = type(cfg1).from_dict({**cfg1.to_dict(), "stage": "stage2", "max_steps": stage2_steps,
                                 "batch_size": stage2_batch, "lr_new": 2e-3, "t2c_warmup_steps": t2c_warmup_steps,
                                 "t2c_final_steps": t2c_final_steps,
                                 "warmup_steps": max(1, stage2_steps // 10), "log_every": 5,
                                 "out_dir": None if out_dir is None else str(Path(out_dir) / "train-stage2")})
    r2 = fit(model, lab.dataset("train", with_targets=True, **model.reading), cfg2,
             measured="by_source", train_types=lab.types("train"))
    r2["seconds"] = time.perf_counter() - t0 - r1["seconds"]
    return r1, r2
