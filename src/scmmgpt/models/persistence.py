"""Saving and loading :class:`~scmmgpt.models.scmmgpt.ScMMGPT`: safetensors + JSON only.

A model folder holds ``config.json`` (:class:`ModelConfig`), ``vocab.json`` (``{gene: index}``),
``model.safetensors`` (trained weights; the base LM is referenced by name unless ``full=True``)
and ``manifest.json`` with the sha256 of each file, verified on load. Every file is written to a
temporary name and renamed, and the manifest last, so a half-written folder never loads.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..data.vocab import GeneVocab
from ..errors import CheckpointError
from ..utils.io import atomic_path, atomic_write_text
from .config import ModelConfig

__all__ = ["save_model", "load_model", "sha256", "verify_manifest"]

FILES = ("config.json", "vocab.json", "model.safetensors")


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def save_model(model, path: str | os.PathLike, *, full: bool = False) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    manifest = path / "manifest.json"
    if manifest.exists():
        manifest.unlink()  # the folder is invalid until the new manifest lands
    model.config.save(path / "config.json")
    model.vocab.save(path / "vocab.json")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.trained_state_dict(full=full).items()}
    # tied weights share storage; safetensors needs distinct tensors
    seen: dict[int, str] = {}
    for k, v in list(state.items()):
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            state[k] = v.clone()
        seen.setdefault(ptr, k)
    with atomic_path(path / "model.safetensors", suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "full": str(full)})
    info = {"files": {name: sha256(path / name) for name in FILES}, "full": full, "format": "scmmgpt-1"}
    atomic_write_text(manifest, json.dumps(info, indent=2))


def verify_manifest(path: Path) -> dict:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise CheckpointError(f"{path} has no manifest.json: not a complete scmmgpt model folder "
                              f"(interrupted save, or not written by save_pretrained).")
    info = json.loads(manifest.read_text())
    for name, digest in info["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing.")
        if sha256(f) != digest:
            raise CheckpointError(f"{f} does not match its sha256 in manifest.json: the file was modified or truncated.")
    return info


def load_model(path: str | os.PathLike, *, with_lm: bool | None = None, device="cpu"):
    from .scmmgpt import ScMMGPT

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Model folder {path} does not exist.")
    info = verify_manifest(path)
    config = ModelConfig.load(path / "config.json")
    vocab = GeneVocab.from_json(path / "vocab.json")
    state = load_file(str(path / "model.safetensors"))
    has_lm = any(k.startswith(("lm_proj.", "text_to_cell.")) for k in state)
    with_lm = has_lm if with_lm is None else with_lm
    model = ScMMGPT.build(config, vocab, with_lm=with_lm)
    lm_side = ("lm.", "lm_proj.", "text_to_cell.", "cell_decoder.")
    if not with_lm:
        state = {k: v for k, v in state.items() if not k.startswith(lm_side)}
    expected = model.trained_state_dict(full=info.get("full", False))
    if with_lm and not has_lm:
        # an aligned (stage-1) model gains a fresh LM side: stage 2 trains it
        expected = {k: v for k, v in expected.items() if not k.startswith(lm_side)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(f"{path}/model.safetensors does not fit the model: missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}.")
    model.load_state_dict(state, strict=False)
    model.fresh_parameters = {n for n in model.fresh_parameters if n not in state}
    return model.to(device).eval()
