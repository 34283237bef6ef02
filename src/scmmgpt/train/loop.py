"""The training loop on Hugging Face Accelerate: one CPU process, or ``accelerate launch`` for DDP
across GPUs and nodes (the sampler shards batches by rank; gradients are all-reduced by DDP).

Checkpoints (``checkpoint-{step}``) hold the trainable weights (safetensors), the optimiser and
scheduler states, every RNG state, the data position and the resolved configs. They are written
into a temporary folder that is renamed into place, so a crash never leaves a half checkpoint that
looks complete. ``resume=True`` continues from the newest one; with ``deterministic=True`` the
resumed run ends with exactly the weights of an uninterrupted run (same seed, same device).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.dataset import BalancedBatchSampler, CellTextDataset, LengthBucketSampler, balance_weights
from ..data.source import measured_genes
from ..errors import CheckpointError, ConfigError, OutputError
from ..eval.annotation import topk_accuracy
from ..inference import evaluation_mode, iter_batches
from ..models.scmmgpt import set_lm_attention
from ..models.stages import StageSpec, stage_spec
from ..modules.losses import measured_rows
from ..utils.io import atomic_write_text
from ..utils.memory import check_batch_memory
from ..utils.precision import Precision, resolve_precision
from .config import TrainConfig
from .schedule import linear_schedule
from .warmup import group_means, group_of_cells, warm_up_text_to_cell
from .wise import interpolate, trained_snapshot

__all__ = ["fit", "linear_schedule", "latest_checkpoint", "validate", "resolve_train_precision"]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """Newest ``checkpoint-N`` folder that holds a ``state.json`` (written last)."""
    out = Path(out_dir)
    if not out.is_dir():
        return None
    done = [p for p in out.glob("checkpoint-*") if (p / "state.json").is_file() and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _measured_for(measured, ds: CellTextDataset, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(masks, group)`` for ``ds``: a (V,) mask and no group, or with ``"by_source"`` the (G, V)
    masks of the cells' source datasets and each cell's source (one source: its (V,) mask)."""
    if measured is None:
        return None, None
    if isinstance(measured, str):
        if measured != "by_source":
            raise ConfigError(f"measured must be a (V,) mask, 'by_source' or None, got {measured!r}.")
        m = measured_genes(ds.cells)
        masks = torch.from_numpy(m.masks).to(device)
        if len(m.masks) == 1:
            return masks[0], None
        return masks, torch.from_numpy(m.group).to(device)
    if isinstance(measured, torch.Tensor):
        return measured.to(device), None
    return torch.from_numpy(np.asarray(measured, dtype=bool)).to(device), None


def validate(model, val: CellTextDataset, stage: str | StageSpec, *, batch_size: int, measured=None,
             max_cells: int = 512, seed: int = 0, labels: Sequence[str] | None = None,
             label_terms: Mapping[str, str] | None = None, precision: str = "auto") -> dict:
    """Validation loss (mean over batches) and, for alignment stages with ``labels`` (the cell type
    of each validation cell), zero-shot Acc@1 over their distinct types, scored by
    :meth:`~scmmgpt.models.scmmgpt.ScMMGPT.score_labels` exactly as ``tl.annotate`` scores them;
    ``label_terms`` maps type names to their Cell Ontology terms (``LabelledCells.label_set()``)."""
    spec = stage_spec(stage)
    n = min(len(val), max_cells)
    idx = np.random.default_rng(seed).permutation(len(val))[:n]
    gen = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    n_batches = 0
    masks, group = _measured_for(measured, val, model.device)
    with evaluation_mode(model.net, precision):
        for batch in iter_batches(model, val, batch_size, with_text=True, indices=idx):
            if len(batch) < 2:
                continue
            out = model.net(batch, spec, measured_rows(masks, group, batch.index), gen)
            for k, v in {"loss": out.loss, **out.parts()}.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n_batches += 1
    result = {f"val_{k}": v / max(n_batches, 1) for k, v in totals.items()}
    if spec.align and labels is not None:
        names = [str(labels[int(i)]) for i in idx]
        types = sorted(set(names))
        cands = {t: label_terms.get(t, t) for t in types} if label_terms else types
        scores = model.score_labels(val, cands, batch_size=batch_size, indices=idx, precision=precision)
        result["val_acc1"] = topk_accuracy(scores.scores, np.array([types.index(t) for t in names]), 1)
    return result


def _rng_state(gen: torch.Generator) -> dict:
    # the loop draws from torch's RNG (dropout; forked, see fit) and from its own generator only
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "negatives": gen.get_state()}


def _set_rng_state(rng: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    gen.set_state(rng["negatives"])


def _save(accelerator, model, optimizer, scheduler, step, epoch, batch_in_epoch, out_dir: Path, cfg, gen) -> Path:
    target = out_dir / f"checkpoint-{step}"
    if not accelerator.is_main_process:
        return target
    tmp = out_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_checkpoint(accelerator, model, optimizer, scheduler, step, epoch, batch_in_epoch, tmp, cfg, gen)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"Could not write checkpoint-{step} in {out_dir}: {exc}. The previous checkpoints are "
                          "intact; free disk space (or set train.out_dir elsewhere) and continue with --resume.") \
            from exc
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _write_checkpoint(accelerator, model, optimizer, scheduler, step, epoch, batch_in_epoch, tmp: Path, cfg,
                      gen) -> None:
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    unwrapped = accelerator.unwrap_model(model)
    trainable = {n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    torch.save(_rng_state(gen), tmp / "rng.pt")
    unwrapped.config.save(tmp / "model_config.json")
    atomic_write_text(tmp / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
    # state.json is written last: its presence marks a complete checkpoint
    atomic_write_text(tmp / "state.json", json.dumps({"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                                       "stage": cfg.stage}))


def _load(ckpt: Path, model, optimizer, scheduler, gen, cfg: TrainConfig) -> dict:
    from safetensors.torch import load_file

    state = json.loads((ckpt / "state.json").read_text())
    if state.get("stage") != cfg.stage:
        raise CheckpointError(f"{ckpt} is a {state.get('stage')!r} checkpoint but this run is {cfg.stage!r}; "
                              "use another out_dir or the matching --stage/--task.")
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        raise CheckpointError(f"{ckpt} does not match this model: {len(set(weights) ^ expected)} trainable weights "
                              "differ. Resume with the same model configuration.")
    with torch.no_grad():
        for n, v in weights.items():
            params[n].copy_(v)
    opt = torch.load(ckpt / "optim.pt", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True), gen)
    return state


def _truncate_log(path: Path, step: int) -> None:
    """Drop the records a killed run logged after the checkpoint it resumes from (they are redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut off by the crash
            continue
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


class _Log:
    """metrics.jsonl (+ optional TensorBoard) on the main process."""

    def __init__(self, out_dir: Path | None, enabled: bool, tensorboard: bool) -> None:
        self.path = out_dir / "metrics.jsonl" if (out_dir is not None and enabled) else None
        self.tb = None
        if tensorboard and self.path is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard=True needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(out_dir / "tb"))

    def write(self, rec: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def fit(model, train: CellTextDataset, cfg: TrainConfig, *, val: CellTextDataset | None = None,
        val_labels: Sequence[str] | None = None, label_terms: Mapping[str, str] | None = None,
        measured: np.ndarray | str | None = None, train_types: Sequence[str] | None = None, resume: bool = False,
        stop_after: int | None = None) -> dict:
    """Train ``model`` on ``train`` for ``cfg.max_steps`` optimiser steps.

    Parameters
    ----------
    model
        A :class:`~scmmgpt.models.scmmgpt.ScMMGPT`; what trains and which losses run are read from
        ``STAGES[cfg.stage]`` (:mod:`scmmgpt.models.stages`).
    train, val
        Cells with descriptions (and PCGen targets for stage 2 / generate); ``val`` is evaluated
        every ``cfg.val_every`` steps and at the end. Both are read through the model's input
        panel (:meth:`~scmmgpt.models.scmmgpt.ScMMGPT.choose_input_panel`, picked from ``train``
        when the config asks for one and the model has none yet).
    val_labels, label_terms
        Cell type of each ``val`` cell: alignment stages then report zero-shot Acc@1 over them (each
        type read with its Cell Ontology term from ``label_terms``, as ``LabelledCells.label_set()``).
    measured
        (V,) bool genes the training data measured (PCGen mask), or ``"by_source"``: each cell is
        scored on the genes its own source dataset measured (:func:`~scmmgpt.data.source.measured_genes`;
        a corpus of shards from several datasets).
    train_types
        Cell type of each ``train`` cell, for ``cfg.balance`` by type; also recorded in the model
        (``config.trained_types``, read by the zero-shot ontology back-off).
    resume
        Continue from the newest checkpoint in ``cfg.out_dir``.
    stop_after
        Stop (after checkpointing) once this many steps are done — to simulate an interruption.

    Training draws random numbers from its own generators and from a fork of torch's global RNG
    seeded with ``cfg.seed``: the caller's RNG state is the same after ``fit`` as before.

    Returns
    -------
    dict with ``steps``, ``history`` (logged records), ``validation`` (last validation record),
    ``t2c_warmup`` and ``t2c_final`` (the text-to-cell fits before and after the joint steps, or
    ``None``), ``cells_per_s``, ``precision`` (``cfg.precision`` resolved: ``bf16`` /
    ``fp32`` / ``fp16``) and ``balance`` (``cfg.balance`` resolved).
    """
    if train.texts is None:
        raise ConfigError("Training needs a description for every cell (CellTextDataset(texts=...)).")
    if cfg.deterministic and torch.cuda.is_available() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        raise ConfigError("train.deterministic=true on CUDA needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment "
                          "before the process starts (cuBLAS reads it once); export it, or train with "
                          "train.deterministic=false.")
    cfg = resolve_train_precision(cfg)
    # the model reads every cell through its input panel, chosen here from the training cells on
    # a fresh model's first run (config n_input_genes) and kept from then on
    panel = model.choose_input_panel(train.cells)
    if train_types is not None:
        model.record_trained_types(train_types)
    for ds in (train, val):
        if ds is not None:
            ds.read_through(panel, model.config.target_sum)
    previous = torch.are_deterministic_algorithms_enabled()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            # WiSE-FT's start: the weights the task will train, before any step (or a resumed checkpoint)
            start = trained_snapshot(model.net, cfg.stage) if cfg.wise_alpha < 1 else None
            run = _setup(model, train, cfg, measured, resume, train_types)
            run.wise_start = start
            return _train(run, model, cfg, val, val_labels, label_terms, stop_after)
        finally:
            torch.use_deterministic_algorithms(previous)


@dataclass
class _Run:
    """Everything ``_train`` steps through, made by ``_setup``."""

    spec: StageSpec
    accelerator: Any
    net: torch.nn.Module
    """The network as prepared by accelerate (DDP-wrapped on several processes)."""
    core: torch.nn.Module
    """The unwrapped network."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: LengthBucketSampler | BalancedBatchSampler
    balance: str
    """``cfg.balance`` resolved (``none``, ``type``, ``source``, ``source_type``)."""
    loader: DataLoader
    params: list
    gen: torch.Generator
    """Hard-negative sampling."""
    measured: torch.Tensor | None
    """(V,) PCGen mask, or (G, V) per source with ``measured_group``."""
    measured_group: torch.Tensor | None
    """(N,) source of each training cell (``measured="by_source"`` over several sources)."""
    out_dir: Path | None
    warmup: dict | None
    precision: Precision
    scaler: torch.amp.GradScaler | None
    """fp16 only: loss scaling."""
    step: int = 0
    epoch: int = 0
    skip: int = 0
    wise_start: dict | None = None
    """``cfg.wise_alpha < 1``: the trained parameters as the run started (:mod:`scmmgpt.train.wise`)."""
    group_targets: tuple[torch.Tensor, torch.Tensor] | None = None
    """``cfg.pcgen_group_targets``: ``(means (G, V), group of each training cell (N,))``."""


def resolve_train_precision(cfg: TrainConfig, *, quiet: bool = False) -> TrainConfig:
    """``cfg`` with ``precision`` resolved (``auto`` -> ``bf16`` or ``fp32``) for the device training
    runs on (CUDA when there is one, as accelerate picks); the choice is logged."""
    import dataclasses

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device, quiet=quiet).name)


def _sampler(train: CellTextDataset, cfg: TrainConfig, train_types, spec: StageSpec, accelerator
             ) -> tuple[LengthBucketSampler | BalancedBatchSampler, str]:
    """The batch sampler ``cfg.balance`` asks for, and the balance it resolved to."""
    sources = measured_genes(train.cells)
    kind = cfg.balance
    if kind == "auto":
        kind = "none" if len(sources.names) == 1 else ("source_type" if train_types is not None else "source")
    if kind != "none":
        if "type" in kind and train_types is None:
            raise ConfigError(f"train.balance={kind} needs each training cell's type (fit(train_types=...)); "
                              "use train.balance=source or none.")
        if train_types is not None and len(train_types) != len(train):
            raise ConfigError(f"{len(train_types)} train_types for {len(train)} training cells.")
        src = sources.group if "source" in kind else np.zeros(len(train), dtype=np.int64)
        typ = np.asarray(train_types, dtype=object) if "type" in kind else np.zeros(len(train), dtype=np.int64)
        stratum, p = balance_weights(src, typ, power=cfg.balance_power)
        return BalancedBatchSampler(stratum, p, cfg.batch_size, seed=cfg.seed, num_replicas=accelerator.num_processes,
                                    rank=accelerator.process_index), kind
    random_batches = cfg.length_bucketing is False or (cfg.length_bucketing is None and spec.random_batches)
    return LengthBucketSampler(train.lengths(), cfg.batch_size, seed=cfg.seed, drop_last=True,
                               pool_batches=1 if random_batches else 50,
                               num_replicas=accelerator.num_processes, rank=accelerator.process_index), kind


def _setup(model, train: CellTextDataset, cfg: TrainConfig, measured, resume: bool, train_types=None) -> _Run:
    """Accelerator, trainable set, warm-up, optimiser, sampler, loader, and a resumed state."""
    from accelerate import Accelerator

    # autocast at cfg.precision (resolved by fit) is the loop's own, not accelerate's: accelerate's
    # precision is process-global and could not change between two fits in one process
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=not torch.cuda.is_available())
    precision = resolve_precision(cfg.precision, accelerator.device, quiet=True)
    scaler = torch.amp.GradScaler(accelerator.device.type) if precision.name == "fp16" else None
    net = model.net
    set_lm_attention(net.lm, accelerator.device)      # accelerate moves the network; the LM's kernel follows it
    spec = net.set_trainable(stage_spec(cfg.stage, cfg.losses))
    model.record_trained_losses(spec.losses)
    net.train()
    if cfg.gradient_checkpointing:
        net.cell_encoder.gradient_checkpointing = True
        if net.lm is not None and spec.needs_lm:
            net.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        net.cell_encoder.compile(dynamic=True)
        net.qformer.compile(dynamic=True)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    ckpt = latest_checkpoint(out_dir) if resume and out_dir is not None else None
    warmup = None
    masks, group = _measured_for(measured, train, accelerator.device)
    if cfg.t2c_warmup_steps and spec.warm_up_text_to_cell and ckpt is None:
        # before DDP wraps the network (its construction broadcasts rank 0's weights to every rank)
        net.to(accelerator.device)
        warmup = warm_up_text_to_cell(
            model, train, steps=cfg.t2c_warmup_steps, batch_size=cfg.t2c_warmup_batch,
            lr=cfg.lr_new or cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed, device=accelerator.device,
            measured=masks, measured_group=group, balanced=cfg.t2c_warmup_balanced, scale=cfg.pcgen_scale)
    groups = model.param_groups(cfg.lr, cfg.lr_new)
    params = [p for g in groups for p in g["params"]]
    # fused AdamW: one kernel for every parameter (on a CPU ~8x faster than the per-tensor loop)
    fused = accelerator.device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    scheduler = linear_schedule(optimizer, cfg.warmup_steps, cfg.max_steps)
    sampler, balance = _sampler(train, cfg, train_types, spec, accelerator)
    if len(sampler) == 0:
        raise ConfigError(f"{len(train)} training cells give no full batch of {cfg.batch_size} per process; "
                          "lower batch_size.")
    # the loader gets its own generator so creating an iterator never draws from the global RNG
    loader = DataLoader(train, batch_sampler=sampler, collate_fn=model.collator(), num_workers=cfg.num_workers,
                        pin_memory=accelerator.device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))
    wrapped, optimizer = accelerator.prepare(net, optimizer)
    core = accelerator.unwrap_model(wrapped)
    gen = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    check_batch_memory(model, cfg.batch_size, training=True, with_lm=spec.needs_lm, device=accelerator.device)
    run = _Run(spec, accelerator, wrapped, core, optimizer, scheduler, sampler, balance, loader, params, gen, masks,
               group, out_dir, warmup, precision, scaler)
    if cfg.pcgen_group_targets and "pcgen" in spec.losses:
        run.group_targets = _pcgen_group_targets(train, group, accelerator.device, cfg.pcgen_scale)
    if ckpt is not None:
        state = _load(ckpt, core, optimizer, scheduler, gen, cfg)
        run.step, run.epoch, run.skip = state["step"], state["epoch"], state["batch_in_epoch"]
        if accelerator.is_main_process:
            _truncate_log(out_dir / "metrics.jsonl", run.step)
    if out_dir is not None and accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
        core.config.save(out_dir / "model_config.json")
    return run


def _pcgen_group_targets(train: CellTextDataset, source: torch.Tensor | None, device, scale: str = "eq1",
                         max_bytes: int = 1 << 30) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(means, group)`` for :attr:`TrainConfig.pcgen_group_targets`, or ``None`` where the cells
    carry no descriptions, most descriptions are a cell's own, or the means would not fit ``max_bytes``."""
    if train.texts is None or not train.with_targets:
        return None
    _, text = np.unique(np.asarray(train.texts, dtype=object), return_inverse=True)
    src = source.cpu().numpy() if source is not None else None
    n_groups = int(group_of_cells(text, src).max()) + 1
    if n_groups > len(train) // 2 or n_groups * train.cells.rows_csr(np.arange(1)).shape[1] * 4 > max_bytes:
        return None
    means, _, _, _, cell_group = group_means(train, np.arange(len(train)), text, src, scale=scale)
    return torch.from_numpy(means).to(device), torch.from_numpy(cell_group).to(device)


def _train(run: _Run, model, cfg: TrainConfig, val, val_labels, label_terms, stop_after) -> dict:
    """The optimiser steps, logging, validation and checkpoints; epoch after epoch until done."""
    from tqdm.auto import tqdm

    acc = run.accelerator
    log = _Log(run.out_dir, acc.is_main_process, cfg.tensorboard)
    if run.warmup is not None:
        log.write({"step": 0, "t2c_warmup": run.warmup})
    history, last_val, n_cells, t0 = [], {}, 0, time.perf_counter()

    def validate_now() -> dict:
        return validate(model, val, run.spec, batch_size=cfg.batch_size,
                        measured="by_source" if run.measured_group is not None else run.measured,
                        max_cells=cfg.val_max_cells, seed=cfg.seed, labels=val_labels,
                        label_terms=label_terms, precision=cfg.precision)

    bar = tqdm(total=cfg.max_steps, initial=run.step, desc=cfg.stage, dynamic_ncols=True,
               disable=not (cfg.progress and acc.is_main_process))
    done = run.step >= cfg.max_steps
    while not done:
        run.sampler.set_epoch(run.epoch, run.skip)
        for b_idx, batch in enumerate(run.loader, start=run.skip):
            batch = batch.to(acc.device)
            if run.group_targets is not None:
                means, cell_group = run.group_targets
                batch.target = means.index_select(0, cell_group.index_select(0, batch.index.to(cell_group.device)))
            with acc.accumulate(run.net):
                with run.precision.autocast():
                    out = run.net(batch, run.spec, measured_rows(run.measured, run.measured_group, batch.index),
                                  run.gen)
                acc.backward(out.loss if run.scaler is None else run.scaler.scale(out.loss))
                if acc.sync_gradients and cfg.clip_grad:
                    if run.scaler is not None:
                        run.scaler.unscale_(run.optimizer)
                    acc.clip_grad_norm_(run.params, cfg.clip_grad)
                if run.scaler is None:
                    run.optimizer.step()
                else:
                    run.scaler.step(run.optimizer)
                    run.scaler.update()
                run.optimizer.zero_grad(set_to_none=True)
            n_cells += len(batch) * acc.num_processes
            if not acc.sync_gradients:
                continue
            run.scheduler.step()
            run.step += 1
            bar.update(1)
            done = run.step >= cfg.max_steps or (stop_after is not None and run.step >= stop_after)
            want_val = val is not None and ((cfg.val_every and run.step % cfg.val_every == 0)
                                            or run.step >= cfg.max_steps)
            if run.step % cfg.log_every == 0 or done or want_val:
                # float() forces a device sync; only on log steps
                rec = {"step": run.step, "loss": float(out.loss.detach()),
                       **{k: float(v.detach()) for k, v in out.parts().items()},
                       "lr": run.scheduler.get_last_lr()[-1], "cells_per_s": n_cells / (time.perf_counter() - t0)}
                bar.set_postfix(loss=f"{rec['loss']:.3f}", cells_s=f"{rec['cells_per_s']:.1f}")
                if want_val:
                    last_val = validate_now()
                    rec.update(last_val)
                history.append(rec)
                log.write(rec)
            if run.out_dir is not None and (done or (cfg.save_every and run.step % cfg.save_every == 0)):
                _save(acc, run.net, run.optimizer, run.scheduler, run.step, run.epoch, b_idx + 1, run.out_dir, cfg,
                      run.gen)
            if done:
                break
        else:
            run.epoch += 1
            run.skip = 0
    bar.close()
    acc.wait_for_everyone()
    if run.wise_start is not None and run.step >= cfg.max_steps:
        interpolate(run.core, run.wise_start, cfg.wise_alpha)
        rec = {"step": run.step, "wise_alpha": cfg.wise_alpha}
        if val is not None:
            last_val = validate_now()
            rec.update(last_val)
        history.append(rec)
        log.write(rec)
    final = None
    if cfg.t2c_final_steps and run.spec.warm_up_text_to_cell and run.step >= cfg.max_steps:
        # the joint steps moved the LoRA-adapted LM states the projector reads: re-fit it on them
        final = warm_up_text_to_cell(
            model, run.loader.dataset, steps=cfg.t2c_final_steps, batch_size=cfg.t2c_warmup_batch,
            lr=cfg.lr_new or cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed + 1, device=acc.device,
            measured=run.measured, measured_group=run.measured_group, balanced=cfg.t2c_warmup_balanced,
            scale=cfg.pcgen_scale)
        log.write({"step": run.step, "t2c_final": final})
    log.close()
    run.core.eval()
    # what was trained here is no longer at initialisation (as after save + reload)
    model.fresh_parameters -= {n for n, p in run.core.named_parameters() if p.requires_grad}
    return {"steps": run.step, "history": history, "validation": last_val, "t2c_warmup": run.warmup, "t2c_final": final,
            "cells_per_s": n_cells / max(time.perf_counter() - t0, 1e-9), "precision": cfg.precision,
            "balance": run.balance}
