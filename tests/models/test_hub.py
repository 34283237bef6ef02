"""Models by name: a folder, a model shipped in the package, or a Hugging Face Hub repository at a
pinned revision read through the Hub's cache (here a local folder laid out as that cache, with the
Hub offline); ``push_to_hub`` writes the same folder and its card."""

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scmmgpt.data.vocab import GeneVocab
from scmmgpt.errors import CheckpointError
from scmmgpt.models.config import ModelConfig
from scmmgpt.models.hub import resolve_model
from scmmgpt.models.scmmgpt import ScMMGPT


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", max_genes=16)
    cfg.qformer.n_layers, cfg.qformer.n_query, cfg.qformer.cross_attention_freq = 1, 2, 1
    cfg.qformer.train_word_embeddings = False
    return ScMMGPT.build(cfg, GeneVocab.from_genes([f"GENE{i}" for i in range(50)]), with_lm=False)


class _CacheHub:
    """Stands in for ``huggingface_hub.HfApi``: an upload becomes a commit laid out exactly as the
    Hub cache holds a downloaded revision (``models--owner--name/snapshots/<sha>/``, ``refs/<branch>``)."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.calls: list[str] = []

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(f"create_repo {repo_id}")

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(f"create_branch {branch}")

    def upload_folder(self, *, repo_id, folder_path, revision=None, commit_message=None):
        folder = Path(folder_path)
        h = hashlib.sha1()
        for f in sorted(folder.iterdir()):
            h.update(f.name.encode() + f.read_bytes())
        sha = h.hexdigest()
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / sha)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / (revision or "main")).write_text(sha)
        self.calls.append(f"upload {commit_message}")
        return SimpleNamespace(oid=sha)


def _same_weights(a: ScMMGPT, b: ScMMGPT) -> bool:
    sa, sb = a.net.trained_state_dict(), b.net.trained_state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_push_to_hub_then_load_pinned_revision_offline(small, tmp_path, monkeypatch, caplog):
    hub = _CacheHub(tmp_path / "hub")
    sha = small.push_to_hub("lab/pbmc-test", commit_message="first", api=hub)
    assert hub.calls == ["create_repo lab/pbmc-test", "upload first"]
    snap = tmp_path / "hub" / "models--lab--pbmc-test" / "snapshots" / sha
    assert {p.name for p in snap.iterdir()} == {"config.json", "vocab.json", "model.safetensors", "manifest.json",
                                                 "README.md"}
    card = (snap / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: scmmgpt") and 'load_model("lab/pbmc-test@<commit>")' in card
    # the frozen BERT token embeddings are not stored; they come from the bundled BERT on load
    from safetensors.torch import load_file

    assert "qformer.word_embeddings.weight" not in load_file(str(snap / "model.safetensors"))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pinned = ScMMGPT.from_pretrained(f"lab/pbmc-test@{sha}", cache_dir=tmp_path / "hub")
    assert _same_weights(pinned, small)
    assert torch.equal(pinned.net.qformer.word_embeddings.weight, small.net.qformer.word_embeddings.weight)
    same = ScMMGPT.from_pretrained("lab/pbmc-test", revision=sha, cache_dir=tmp_path / "hub")
    assert _same_weights(same, small)
    # a branch follows its newest commit, with a warning that it can move
    with caplog.at_level("WARNING"):
        ScMMGPT.from_pretrained("lab/pbmc-test", cache_dir=tmp_path / "hub")
    assert "Pin a commit" in caplog.text
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache and with HF_HUB_OFFLINE set"):
        ScMMGPT.from_pretrained("lab/pbmc-test@" + "0" * 40, cache_dir=tmp_path / "hub")
    with pytest.raises(CheckpointError, match="Two revisions"):
        resolve_model(f"lab/pbmc-test@{sha}", revision="main", cache_dir=tmp_path / "hub")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set: nothing can be pushed"):
        small.push_to_hub("lab/pbmc-test")              # the real client, refused before any request


def test_push_to_a_branch_in_half_precision(small, tmp_path, monkeypatch):
    hub = _CacheHub(tmp_path / "hub")
    sha = small.push_to_hub("lab/half", branch="v1", dtype="float16", api=hub)
    assert hub.calls[1] == "create_branch v1"
    assert (tmp_path / "hub" / "models--lab--half" / "refs" / "v1").read_text() == sha
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    half = ScMMGPT.from_pretrained("lab/half@v1", cache_dir=tmp_path / "hub")
    info = json.loads((resolve_model("lab/half@v1", cache_dir=tmp_path / "hub") / "manifest.json").read_text())
    assert info["stored_dtype"] == "float16"
    for k, v in small.net.trained_state_dict().items():
        w = half.net.trained_state_dict()[k]
        assert w.dtype == v.dtype and torch.allclose(w, v, atol=1e-3, rtol=1e-3), k


def test_resolve_names_and_refusals(small, tmp_path):
    small.save_pretrained(tmp_path / "m")
    assert resolve_model(tmp_path / "m") == tmp_path / "m"
    with pytest.raises(CheckpointError, match="is a local folder"):
        resolve_model(tmp_path / "m", revision="abc")
    with pytest.raises(CheckpointError, match="not a folder, not a shipped model .*pbmc-small"):
        resolve_model("no/such/thing")
    with pytest.raises(CheckpointError, match="shipped with the package; it has no revisions"):
        resolve_model("pbmc-small", revision="main")
    with pytest.raises(CheckpointError, match="Unknown storage dtype"):
        small.save_pretrained(tmp_path / "x", dtype="int8")
