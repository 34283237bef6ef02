"""Model folders on disk: safetensors + JSON only. The files, not the model: building the model
from what is read is :meth:`~scmmgpt.models.scmmgpt.ScMMGPT.from_pretrained`'s job.

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

import torch
from safetensors.torch import load_file, save_file

from ..data.vocab import GeneVocab
from ..errors import CheckpointError
from ..utils.io import atomic_path, atomic_write_text
from .config import ModelConfig

__all__ = ["write_model_folder", "read_model_folder", "sha256", "verify_manifest", "LM_SIDE"]

FILES = ("config.json", "vocab.json", "model.safetensors")
#: Weight name prefixes of the LM side (absent from a stage-1 model).
LM_SIDE = ("lm.", "lm_proj.", "text_to_cell.", "cell_decoder.")


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


_STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def write_model_folder(path: str | os.PathLike, config: ModelConfig, vocab: GeneVocab,
                       state: dict[str, torch.Tensor], *, full: bool = False, dtype: str | None = None) -> None:
    """Write ``config.json``, ``vocab.json``, ``model.safetensors`` and, last, ``manifest.json``.

    ``dtype`` (``float16``, ``bfloat16``; ``None``: as held) stores the floating-point weights in
    that precision, for a model shipped in little space; they load back into the model's own dtype."""
    if dtype is not None and dtype not in _STORE_DTYPES:
        raise CheckpointError(f"Unknown storage dtype {dtype!r}; choose from {sorted(_STORE_DTYPES)}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    manifest = path / "manifest.json"
    if manifest.exists():
        manifest.unlink()  # the folder is invalid until the new manifest lands
    config.save(path / "config.json")
    vocab.save(path / "vocab.json")
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if dtype is not None:
        state = {k: v.to(_STORE_DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    # tied weights share storage; safetensors needs distinct tensors
    seen: dict[int, str] = {}
    for k, v in list(state.items()):
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            state[k] = v.clone()
        seen.setdefault(ptr, k)
    with atomic_path(path / "model.safetensors", suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "full": str(full)})
    info = {"files": {name: sha256(path / name) for name in FILES}, "full": full, "format": "scmmgpt-1",
            **({"stored_dtype": dtype} if dtype is not None else {})}
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


def read_model_folder(path: str | os.PathLike) -> tuple[ModelConfig, GeneVocab, dict[str, torch.Tensor], dict]:
    """``(config, vocab, state, manifest)`` of a model folder, checksums verified."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Model folder {path} does not exist.")
    info = verify_manifest(path)
    return (ModelConfig.load(path / "config.json"), GeneVocab.from_json(path / "vocab.json"),
            load_file(str(path / "model.safetensors")), info)
