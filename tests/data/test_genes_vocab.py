import json

import numpy as np
import pytest

from scmmgpt.data.genes import detect_id_type, detect_organism, strip_version, to_symbols
from scmmgpt.data.vocab import GeneVocab
from scmmgpt.errors import InputDataError


def test_ensembl_with_and_without_version():
    assert to_symbols(["ENSG00000141510", "ENSG00000141510.17", "CD3E"], "human") == ["TP53", "TP53", "CD3E"]
    assert strip_version("ENSG00000141510.17") == "ENSG00000141510"
    assert detect_id_type(["ENSG00000141510.1", "ENSG00000105383"]) == "ensembl"
    assert detect_id_type(["CD3E", "MS4A1"]) == "symbol"
    assert detect_id_type(["CD3E", "ENSG00000105383"]) == "mixed"


def test_mouse_ids():
    assert detect_organism(["ENSMUSG00000051951", "ENSMUSG00000025900"]) == "mus_musculus"
    assert to_symbols(["ENSMUSG00000051951"], "mouse") == ["Xkr4"]
    assert detect_organism(["Cd19", "Ms4a1", "Cd79a", "Xkr4"]) == "mus_musculus"


@pytest.mark.shared_data
def test_muscat_ensembl_maps_to_its_symbols():
    import anndata as ad

    from tests.conftest import data_path

    a = ad.read_h5ad(data_path("muscat_kang_se.h5ad"), backed="r")
    syms = to_symbols(a.var_names)
    agree = np.mean([s == t for s, t in zip(syms, a.var["gene_symbol"])])
    assert agree > 0.9


def test_vocab_build_save_load(tmp_path):
    v = GeneVocab.from_genes(["CD3E", "MS4A1", "CD3E", None])
    assert v.tokens == ["<pad>", "<cls>", "<eoc>", "CD3E", "MS4A1"]
    assert list(v.encode(["ms4a1", "CD3E", "NOPE", None, "<cls>"])) == [4, 3, -1, -1, -1]
    v.save(tmp_path / "vocab.json")
    assert GeneVocab.from_json(tmp_path / "vocab.json").tokens == v.tokens


def test_import_scgpt_vocab_keeps_indices(tmp_path):
    # scGPT's whole-human vocab.json has genes first and <pad>, <cls>, <eoc> at the end
    mapping = {"A1BG": 0, "CD3E": 1, "MS4A1": 2, "<pad>": 3, "<cls>": 4, "<eoc>": 5}
    (tmp_path / "vocab.json").write_text(json.dumps(mapping))
    v = GeneVocab.from_json(tmp_path / "vocab.json")
    assert all(v[t] == i for t, i in mapping.items())
    assert (v.pad_id, v.cls_id, v.eoc_id) == (3, 4, 5)
    # a vocabulary without <eoc> gets it appended, other indices unchanged
    (tmp_path / "v2.json").write_text(json.dumps({"<pad>": 2, "<cls>": 0, "CD3E": 1}))
    v2 = GeneVocab.from_json(tmp_path / "v2.json")
    assert (v2.pad_id, v2.cls_id, v2["CD3E"], v2.eoc_id) == (2, 0, 1, 3)


def test_bad_vocab_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputDataError, match="not valid JSON"):
        GeneVocab.from_json(tmp_path / "bad.json")
    (tmp_path / "dup.json").write_text(json.dumps({"<pad>": 0, "<cls>": 0}))
    with pytest.raises(InputDataError, match="used twice"):
        GeneVocab.from_json(tmp_path / "dup.json")
    with pytest.raises(InputDataError, match="does not exist"):
        GeneVocab.from_json(tmp_path / "none.json")
