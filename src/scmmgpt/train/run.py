"""A training run from one configuration: data -> descriptions -> split -> model -> fit -> saved
model. Behind ``scmmgpt pretrain`` and ``scmmgpt finetune``.

A run configuration is YAML with three sections, each a typed dataclass::

    data:  {path: my.h5ad, label_key: cell_type, split: [0.8, 0.1, 0.1], ...}   # DataConfig
    model: {cell: {d_model: 256}, qformer: {n_query: 32}, ...}                    # ModelConfig
    train: {stage: stage1, max_steps: 1000, lr: 1.0e-5, ...}                      # TrainConfig

plus ``init`` (a saved model folder to start from) and ``cell_preset``. Any key can be overridden
with ``section.key=value`` strings (values parsed as YAML), e.g. ``train.lr=1e-4``.
The resolved configuration is written to ``{out_dir}/run_config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ..data.labelled import DataConfig, load_labelled
from ..data.vocab import GeneVocab
from ..errors import ConfigError
from ..models.config import CELL_ENCODER_PRESETS, RUNTIME_KEYS, ModelConfig
from ..utils.io import atomic_write_text
from ..utils.seed import seeded
from .config import TrainConfig

__all__ = ["RunConfig", "load_run_config", "run_training"]

#: ``model`` keys a run from a saved model (``init``) may change: they do not touch stored weights.
INIT_OVERRIDES = RUNTIME_KEYS
_LM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: str | None = None
    """A model folder (``save_pretrained``) to start from; ``None``: a new model from ``model``."""
    cell_preset: str | None = None
    """Named cell encoder size applied before ``model.cell`` keys (``tiny``, ``small``, ...)."""
    model_keys: dict = field(default_factory=dict)
    """The ``model`` keys the configuration gave (dotted, ``{"qformer.n_query": 8}``). With ``init``
    they (and a ``cell_preset``'s sizes) must agree with the saved model, except :data:`INIT_OVERRIDES`,
    which are applied to it; with ``model.cell_checkpoint`` the ``cell.*`` ones must agree with the
    checkpoint."""

    def to_dict(self) -> dict:
        return {"data": dataclasses.asdict(self.data), "model": self.model.to_dict(), "train": self.train.to_dict(),
                "init": self.init, "cell_preset": self.cell_preset}


def _packaged_config(name: str) -> Path | None:
    f = resources.files("scmmgpt") / "configs" / f"{name}.yaml"
    return Path(str(f)) if f.is_file() else None


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override {dotted!r}: {k!r} is not a section.")
    node[keys[-1]] = value


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _numbers(value):
    """YAML 1.1 reads ``1e-4`` (no dot in the mantissa) as a string; every such scalar becomes the
    float it spells, in a whole tree."""
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def load_run_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                    **defaults) -> RunConfig:
    """Read a YAML run configuration (a path, or the name of a packaged one such as ``stage1``),
    apply ``section.key=value`` overrides and build the typed configuration.

    ``defaults`` (``{"train.stage": "stage2"}`` style keys) are applied before the file.
    """
    import yaml

    tree: dict = {}
    for k, v in defaults.items():
        _set(tree, k, v)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            packaged = _packaged_config(str(path))
            if packaged is None:
                raise ConfigError(f"Config {path!r} is neither a file nor a packaged config "
                                  f"({sorted(f.stem for f in Path(str(resources.files('scmmgpt') / 'configs')).glob('*.yaml'))}).")
            p = packaged
        loaded = _numbers(yaml.safe_load(p.read_text()) or {})
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping with data/model/train sections.")
        for section, body in loaded.items():
            if isinstance(body, dict) and isinstance(tree.get(section), dict):
                tree[section].update(body)
            else:
                tree[section] = body
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like section.key=value (e.g. train.lr=1e-4).")
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), _numbers(yaml.safe_load(raw)))
    unknown = set(tree) - {"data", "model", "train", "init", "cell_preset"}
    if unknown:
        raise ConfigError(f"Unknown config sections {sorted(unknown)}; use data, model, train, init, cell_preset.")
    try:
        data = DataConfig(**tree.get("data", {}))
    except TypeError as exc:
        raise ConfigError(f"data section: {exc}") from None
    model_tree = tree.get("model", {}) or {}
    preset = tree.get("cell_preset")
    if preset:
        base = ModelConfig.from_preset(preset).to_dict()
        for k, v in model_tree.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                base[k].update(v)
            else:
                base[k] = v
        model_tree = base
    try:
        model = ModelConfig.from_dict(model_tree)
        train = TrainConfig.from_dict(tree.get("train", {}) or {})
    except TypeError as exc:
        raise ConfigError(f"model/train section: {exc}") from None
    given = {k.removeprefix("model."): v for k, v in _flat(tree.get("model") or {}, "model").items()}
    return RunConfig(data=data, model=model, train=train, init=tree.get("init"), cell_preset=preset,
                     model_keys=given)


def _flat(tree: dict, prefix: str) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def _config_value(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _conflicts(keys: dict, config: ModelConfig) -> str:
    """The given ``keys`` whose values differ from ``config``'s, as ``model.k=v (the model has m)``."""
    def same(a, b) -> bool:
        return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b

    bad = {k: (v, _config_value(config, k)) for k, v in keys.items() if not same(v, _config_value(config, k))}
    return ", ".join(f"model.{k}={v!r} (the model has {m!r})" for k, (v, m) in list(bad.items())[:6])


_SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "d_ff")
"""Cell encoder preset keys that set the weights' shapes."""

_FRESH_ENCODER_KEYS = frozenset({"cell.expression_token"})
"""Cell encoder keys that only a fresh encoder reads: a saved model has its encoder's read-outs and a
scGPT checkpoint's encoder has none of its own, so neither compares nor applies them."""

_NEW_MODEL_KEYS = frozenset({"n_input_genes"}) | _FRESH_ENCODER_KEYS
"""Model keys that only a new model reads: a saved model has chosen its input panel (or has none) and
has its cell encoder, so a run from it neither compares nor applies them."""


def _check_init_keys(rc: RunConfig, config: ModelConfig) -> None:
    """A run from a saved model trains that model: ``model`` keys (and a ``cell_preset``) that
    disagree with it would be recorded but not used, so they are refused, each named; equal ones are
    harmless. A ``cell_preset`` names a size: only its shape keys are compared (a model saved before
    the ``tiny`` preset gained ``attn_dropout=0`` still trains on under ``cpu-small``)."""
    keys = {k: v for k, v in rc.model_keys.items() if k not in INIT_OVERRIDES | _NEW_MODEL_KEYS}
    if rc.cell_preset:
        keys = {**{f"cell.{k}": v for k, v in CELL_ENCODER_PRESETS[rc.cell_preset].items() if k in _SHAPE_KEYS},
                **keys}
    shown = _conflicts(keys, config)
    if shown:
        raise ConfigError(f"A run from a saved model (--model {rc.init}) trains that model as it is; the configuration "
                          f"asks for {shown}. Drop these keys (a config without a model section, such as stage2 or "
                          f"finetune, has none), or train a new model; only {sorted(INIT_OVERRIDES)} may change.")


def _check_checkpoint_keys(rc: RunConfig, config: ModelConfig) -> None:
    """A scGPT checkpoint brings its encoder's sizes: explicit ``model.cell.*`` keys must agree,
    except :data:`_FRESH_ENCODER_KEYS` (``cpu-small`` asks for the expression token, which a scGPT
    encoder does not have and does not get)."""
    shown = _conflicts({k: v for k, v in rc.model_keys.items() if k.startswith("cell.") and k not in _FRESH_ENCODER_KEYS},
                       config)
    if shown:
        raise ConfigError(f"The cell encoder comes from the scGPT checkpoint {rc.model.cell_checkpoint}; the "
                          f"configuration asks for {shown}. Drop the model.cell keys.")


def _with_lm_dtype(config: ModelConfig, lm_keys: dict) -> ModelConfig:
    if not lm_keys:
        return config
    return dataclasses.replace(config, lm=dataclasses.replace(config.lm, dtype=lm_keys["lm.dtype"]))


def run_training(rc: RunConfig, *, resume: bool = False) -> dict:
    """Run one training stage or fine-tuning task; save the model to ``{out_dir}/model``.

    The model is new (``rc.model``, its cell encoder optionally from ``model.cell_checkpoint``) or
    ``rc.init``; ``run_config.yaml`` records the configuration of the model that trains.

    Returns a summary: ``model`` (path), ``steps``, ``validation``, ``cells_per_s``, ``split`` sizes.
    """
    import torch
    import yaml
    from accelerate import PartialState

    from ..models.gate import calibrate_gate
    from ..models.scmmgpt import ScMMGPT
    from ..models.stages import stage_spec
    from .loop import fit, resolve_train_precision

    if not rc.train.out_dir:
        raise ConfigError("train.out_dir is required (where checkpoints and the model go); pass --out.")
    cfg = resolve_train_precision(rc.train, quiet=True)
    spec = stage_spec(cfg.stage, cfg.losses)
    # the frozen LM is held in the training precision unless model.lm.dtype says otherwise
    lm_keys = {"lm.dtype": _LM_DTYPES[cfg.precision]} if rc.model_keys.get("lm.dtype", "auto") == "auto" else {}
    model = None
    # the same seed gives the same initial weights (new model, or the fresh LM side of stage 2); the
    # caller's global RNG is left as it was
    with seeded(cfg.seed):
        if rc.init:
            model = ScMMGPT.from_pretrained(rc.init, with_lm=spec.needs_lm, overrides={
                **{k: v for k, v in rc.model_keys.items() if k in INIT_OVERRIDES}, **lm_keys})
            _check_init_keys(rc, model.config)
        elif cfg.stage != "stage1":
            raise ConfigError(f"{cfg.stage!r} starts from a trained model (stage 2 from the stage-1 model, "
                              "fine-tuning from a pre-trained one): pass --model DIR.")
        elif rc.model.cell_checkpoint is not None:
            model = ScMMGPT.build(_with_lm_dtype(rc.model, lm_keys), None, with_lm=spec.needs_lm)   # its vocabulary is the checkpoint's
            _check_checkpoint_keys(rc, model.config)
        vocab = model.vocab if model is not None else GeneVocab.named(rc.model.vocab) if rc.model.vocab else None
        lab = load_labelled(rc.data, vocab=vocab,
                            target_sum=(model.config if model is not None else rc.model).target_sum)
        if model is None:
            model = ScMMGPT.build(_with_lm_dtype(rc.model, lm_keys), lab.vocab, with_lm=spec.needs_lm)
    mc = model.config
    train = lab.dataset("train", with_targets=spec.needs_lm, **model.reading)
    val = (lab.dataset("val", with_targets=spec.needs_lm, **model.reading)
           if len(lab.split["val"]) else None)
    # the LM's dtype followed this run's precision; the saved model (and its record) loads it as "auto"
    saved = dataclasses.replace(mc, lm=dataclasses.replace(mc.lm, dtype="auto")) if lm_keys else mc
    main = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    out = Path(cfg.out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ran = dataclasses.replace(rc, model=saved, train=cfg)   # the model and precision that train
        atomic_write_text(out / "run_config.yaml", yaml.safe_dump(json.loads(json.dumps(ran.to_dict())),
                                                                   sort_keys=False))
        names = lab.cells.obs_names
        atomic_write_text(out / "split.json", json.dumps({
            "source": lab.source, "train_types": lab.train_types,
            **{k: np.asarray(names[v]).astype(str).tolist() for k, v in lab.split.items()}}))
    # fine-tuning for annotation records a novelty gate, calibrated in the model it starts from
    # (tl.annotate(..., zero_shot_model=that model) sends cells unlike the training cells back to it)
    gate = (calibrate_gate(model, train, lab.types("train"), val=val, terms=lab.label_set())
            if cfg.stage == "annotate" else None)
    result = fit(model, train, cfg, val=val, val_labels=lab.types("val") if val is not None else None,
                 label_terms=lab.label_set(), measured="by_source", train_types=lab.types("train"), resume=resume)
    if main:
        # what fit recorded (input panel, trained types and losses) stays; the LM loads as "auto"
        model.net.config = dataclasses.replace(model.config, lm=saved.lm)
        if gate is not None:
            model.set_gate(gate)
        model.save_pretrained(out / "model")
    PartialState().wait_for_everyone()
    return {"model": str(out / "model"), "steps": result["steps"], "validation": result["validation"],
            "cells_per_s": round(result["cells_per_s"], 2), "split": {k: int(len(v)) for k, v in lab.split.items()},
            "train_types": lab.train_types, "precision": result["precision"], "balance": result["balance"]}
