"""The training loop: setup -> fit, on Hugging Face Accelerate (single CPU process, or
``accelerate launch`` for DDP across GPUs / nodes).

Checkpoints hold the trainable weights, optimiser, scheduler, RNG states and the data position, are
written into a temporary folder renamed into place (``checkpoint-{step}``), and ``resume=True``
continues from the newest complete one.

Status (work in progress, issue 4): the stage-2 loop is tested (CDGen and PCGen fall on real
cells). Not yet verified: that a resumed run ends with exactly the weights of an uninterrupted one
(a first test found a mismatch), and stage-1 learning (CTC stayed near log(batch) in a 40-step run
of a tiny model on 4 cell types).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.dataset import CellTextDataset, LengthBucketSampler
from ..utils.io import atomic_write_text
from .config import TrainConfig

__all__ = ["fit", "linear_schedule", "latest_checkpoint"]


def linear_schedule(optimizer, warmup: int, total: int):
    """Linear warm-up to the peak LR, then linear decay to 0 (paper B.2)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """Newest ``checkpoint-N`` folder that holds a ``state.json`` (written last)."""
    out = Path(out_dir)
    if not out.is_dir():
        return None
    done = [p for p in out.glob("checkpoint-*") if (p / "state.json").is_file() and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _loss(model, batch, stage: str, measured, generator):
    if stage in ("stage1", "annotate"):
        out = model.forward_align(batch, generator)
        return out.loss, {"ctc": out.loss_ctc, "ctm": out.loss_ctm}
    out = model.forward_gen(batch, measured, cdgen=stage in ("stage2", "describe"),
                            pcgen=stage in ("stage2", "generate"))
    parts = {k: v for k, v in (("cdgen", out.loss_cdgen), ("pcgen", out.loss_pcgen)) if v is not None}
    return out.loss, parts


def _save(accelerator, model, optimizer, scheduler, step, epoch, batch_in_epoch, out_dir: Path, cfg, gen) -> Path:
    target = out_dir / f"checkpoint-{step}"
    if not accelerator.is_main_process:
        return target
    tmp = out_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unwrapped = accelerator.unwrap_model(model)
    trainable = {n: p.detach().cpu() for n, p in unwrapped.named_parameters() if p.requires_grad}
    from safetensors.torch import save_file

    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "negatives": gen.get_state()}, tmp / "rng.pt")
    atomic_write_text(tmp / "state.json", json.dumps({"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                                       "config": cfg.to_dict()}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _load(ckpt: Path, model, optimizer, scheduler, gen) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)
    opt = torch.load(ckpt / "optim.pt", weights_only=False)  # our own file: optimizer state has python ints
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    gen.set_state(rng["negatives"])
    return json.loads((ckpt / "state.json").read_text())


def fit(model, train: CellTextDataset, cfg: TrainConfig, *, measured: np.ndarray | None = None,
        resume: bool = False, stop_after: int | None = None) -> dict:
    """Train ``model`` on ``train`` for ``cfg.max_steps`` optimiser steps.

    Parameters
    ----------
    model
        A :class:`~scmmgpt.models.scmmgpt.ScMMGPT`; its trainable set is taken from ``cfg.stage``.
    train
        Cells with descriptions (and PCGen targets for stage 2 / generate).
    measured
        (V,) bool genes the training data measured (PCGen mask).
    resume
        Continue from the newest checkpoint in ``cfg.out_dir``.
    stop_after
        Stop (after checkpointing) once this many steps are done — to simulate an interruption.

    Returns
    -------
    dict with ``steps``, ``history`` (logged losses) and ``cells_per_s``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    model.set_trainable(cfg.stage)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = accelerator.device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    scheduler = linear_schedule(optimizer, cfg.warmup_steps, cfg.max_steps)
    sampler = LengthBucketSampler(train.lengths(), cfg.batch_size, seed=cfg.seed, drop_last=True,
                                  num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    loader = DataLoader(train, batch_sampler=sampler, collate_fn=model.collator(), num_workers=cfg.num_workers,
                        pin_memory=accelerator.device.type == "cuda")
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    gen = torch.Generator().manual_seed(cfg.seed)
    step = epoch = skip = 0
    if resume and out_dir is not None and (ckpt := latest_checkpoint(out_dir)) is not None:
        state = _load(ckpt, core, optimizer, scheduler, gen)
        step, epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
    if out_dir is not None and accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
        core.config.save(out_dir / "model_config.json")
    meas = torch.from_numpy(measured).to(accelerator.device) if measured is not None else None
    history, n_cells, t0 = [], 0, time.perf_counter()
    while step < cfg.max_steps:
        sampler.set_epoch(epoch)
        for b_idx, batch in enumerate(loader):
            if b_idx < skip:
                continue
            batch = batch.to(accelerator.device)
            with accelerator.accumulate(model), accelerator.autocast():
                loss, parts = _loss(core, batch, cfg.stage, meas, gen)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.clip_grad:
                    accelerator.clip_grad_norm_(params, cfg.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            n_cells += len(batch)
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                # .item() forces a device sync; only on log steps
                rec = {"step": step, "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()},
                       "lr": scheduler.get_last_lr()[0], "cells_per_s": n_cells / (time.perf_counter() - t0)}
                history.append(rec)
                if out_dir is not None and accelerator.is_main_process:
                    with open(out_dir / "metrics.jsonl", "a") as fh:
                        fh.write(json.dumps(rec) + "\n")
            done = step >= cfg.max_steps or (stop_after is not None and step >= stop_after)
            if out_dir is not None and (done or (cfg.save_every and step % cfg.save_every == 0)):
                _save(accelerator, model, optimizer, scheduler, step, epoch, b_idx + 1, out_dir, cfg, gen)
            if done:
                break
        else:
            epoch += 1
            skip = 0
            continue
        break
    accelerator.wait_for_everyone()
    model.eval()
    return {"steps": step, "history": history, "cells_per_s": n_cells / max(time.perf_counter() - t0, 1e-9)}
