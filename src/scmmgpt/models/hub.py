"""Where a model comes from: a folder, a model shipped inside the package, or a Hugging Face Hub
repository at a pinned revision; and the model card that goes with a pushed model.

:func:`resolve_model` turns what a user typed (``--model``, ``load_model(...)``) into a model folder:

1. an existing folder (``save_pretrained``'s, a training run's ``model/``);
2. the name of a model shipped in the package (:data:`SHIPPED`, e.g. ``pbmc-small``);
3. a Hub repository id ``owner/name``, with a revision as ``owner/name@REV`` or ``revision=``
   (a commit sha pins the exact weights; a branch or tag follows it). It is read through the Hub's
   cache (``huggingface_hub.snapshot_download``), so with ``HF_HUB_OFFLINE=1`` a cached revision
   loads with no network.
"""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from ..errors import CheckpointError

__all__ = ["SHIPPED", "shipped_model_dir", "resolve_model", "model_card", "push_folder_to_hub", "MODEL_FILES"]

#: Models shipped inside the package: name -> folder under ``scmmgpt/pretrained``.
SHIPPED = {"pbmc-small": "pbmc-small"}
#: What a model folder holds (the card, ``README.md``, and ``held_out.json`` where there is one, too).
MODEL_FILES = ("config.json", "vocab.json", "model.safetensors", "manifest.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def shipped_model_dir(name: str) -> Path:
    """The folder of a shipped model (:data:`SHIPPED`)."""
    if name not in SHIPPED:
        raise CheckpointError(f"No shipped model {name!r}; the package ships {sorted(SHIPPED)}.")
    path = Path(str(resources.files("scmmgpt") / "pretrained" / SHIPPED[name]))
    if not (path / "manifest.json").is_file():
        raise CheckpointError(f"The shipped model {name!r} is missing from this installation ({path}); reinstall "
                              "scmmgpt from a wheel or a full clone of the repository.")
    return path


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(name_or_path: str | os.PathLike[str], *, revision: str | None = None,
                  cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The model folder that ``name_or_path`` names (see the module docstring)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(f"revision={revision!r} applies to a Hub repository, but {text} is a local folder.")
        return path
    if text in SHIPPED:
        if revision is not None:
            raise CheckpointError(f"{text!r} is shipped with the package; it has no revisions.")
        return shipped_model_dir(text)
    repo, _, at = text.partition("@")
    if at and revision is not None and at != revision:
        raise CheckpointError(f"Two revisions for {repo}: @{at} and revision={revision!r}; give one.")
    if not _REPO_ID.match(repo):
        raise CheckpointError(f"Model {text!r} is not a folder, not a shipped model ({', '.join(sorted(SHIPPED))}) "
                              "and not a Hugging Face Hub repository id (owner/name, optionally @revision).")
    return _download(repo, at or revision, cache_dir)


def _download(repo: str, revision: str | None, cache_dir) -> Path:
    import logging

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if revision is None:
        logging.getLogger(__name__).warning(
            "Loading %s at its default branch: the weights can change under you. Pin a commit with "
            "%s@<commit sha> (or revision=).", repo, repo)
    offline = _offline()
    try:
        folder = snapshot_download(repo, revision=revision, cache_dir=cache_dir, local_files_only=offline,
                                   allow_patterns=[*MODEL_FILES, "README.md", "held_out.json"],
                                   library_name="scmmgpt")
    except LocalEntryNotFoundError:
        where = "with HF_HUB_OFFLINE set, only the local cache is read" if offline else "the Hub could not be reached"
        raise CheckpointError(f"{repo}@{revision or 'main'} is not in the Hugging Face cache and {where}. Download "
                              "it once online (or unset HF_HUB_OFFLINE), or pass a local model folder.") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo} has no revision {revision!r}; give a commit sha, branch or tag of the "
                              "repository.") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"No Hugging Face Hub repository {repo!r} (or it is private: log in with "
                              "`hf auth login` or set HF_TOKEN).") from None
    except HfHubHTTPError as exc:
        raise CheckpointError(f"Could not download {repo}@{revision or 'main'}: {exc}") from None
    path = Path(str(folder))
    if not (path / "manifest.json").is_file():
        raise CheckpointError(f"{repo}@{revision or 'main'} is not an scmmgpt model (no manifest.json); push one "
                              "with ScMMGPT.push_to_hub.")
    return path


def model_card(config: Any, vocab_size: int, *, repo_id: str | None = None, name: str | None = None,
               summary: str | None = None, figures: Mapping[str, Any] | None = None, extra: str = "") -> str:
    """A model card (``README.md``: Hub metadata, what the model is, how to load it, its figures).
    ``name``: what ``load_model`` takes (default: ``repo_id@<commit>``)."""
    cell = config.cell
    load = name or (f"{repo_id}@<commit>" if repo_id else "path/to/folder")
    title = name or repo_id or "a model folder"
    lines = ["---", "library_name: scmmgpt", "tags:", "- single-cell", "- scRNA-seq", "- cell-type-annotation",
             "- multimodal", f"base_model: {config.lm.name}", "---", "", f"# scMMGPT: {title}", ""]
    if summary:
        lines += [summary, ""]
    lines += ["## Model", "",
              f"- cell encoder: {cell.n_layers} layers x {cell.d_model} wide, {cell.n_heads} heads; "
              f"{vocab_size - 3:,} genes in its vocabulary; at most {config.max_genes} genes read per cell",
              f"- Q-Former: {config.qformer.bert}, {config.qformer.n_layers or 'all'} layers, "
              f"{config.qformer.n_query} queries",
              f"- text LM: {config.lm.name} (frozen, with LoRA adapters; not stored here)", "",
              "## Use", "", "```python", "import scmmgpt", "",
              f'model = scmmgpt.load_model("{load}")',
              'scmmgpt.tl.annotate(adata, model, labels=["B cell", "T cell", "monocyte"])', "```", ""]
    if figures:
        lines += ["## Figures", "", "```json", json.dumps(dict(figures), indent=1), "```", ""]
    if extra:
        lines += [extra, ""]
    return "\n".join(lines)


def push_folder_to_hub(folder: Path, repo_id: str, *, branch: str | None = None, private: bool | None = None,
                       token: str | None = None, commit_message: str | None = None, api: Any = None) -> str:
    """Upload a model folder as one commit; returns the commit sha (pin it: ``repo_id@sha``).
    ``api``: a ``huggingface_hub.HfApi`` (default: a new one with ``token``)."""
    if not _REPO_ID.match(repo_id):
        raise CheckpointError(f"{repo_id!r} is not a Hub repository id (owner/name).")
    if api is None:
        if _offline():
            raise CheckpointError("HF_HUB_OFFLINE is set: nothing can be pushed. Unset it to push.")
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if branch is not None and branch != "main":
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=branch,
                             commit_message=commit_message or "Upload scmmgpt model")
    return str(getattr(info, "oid", info))
