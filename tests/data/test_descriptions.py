import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scmmgpt.data.descriptions import DescriptionBuilder, DescriptionConfig, is_ambiguous
from scmmgpt.errors import InputDataError
from tests.conftest import data_path


@pytest.fixture(scope="module")
def builder():
    return DescriptionBuilder()


def test_cell_type_by_id_label_synonym(builder):
    by_id = builder.describe_cell_type("CL:0000236")
    assert by_id.startswith("B cell: A lymphocyte of B lineage")
    assert builder.resolve_cell_type("b LYMPHOCYTE").id == "CL:0000236"  # synonym, any case
    assert builder.resolve_cell_type("natural killer cell").id == "CL:0000623"
    assert builder.resolve_cell_type("CD19+ B") is None
    assert builder.describe_cell_type("CD19+ B") == "CD19+ B: a cell annotated as CD19+ B."


def test_label_map_and_context():
    b = DescriptionBuilder(DescriptionConfig(label_map={"CD19+ B": "CL:0000236"}))
    assert "lymphocyte of B lineage" in b.describe_cell_type("CD19+ B")
    obs = pd.DataFrame({"cell_type": ["B cell"], "tissue": ["UBERON:0000178"], "sex": ["female"],
                        "development_stage": ["adult stage"], "disease": ["COVID-19"]})
    d = b.build(obs)["description"].iloc[0]
    assert "Sampled from the blood of a female adult stage donor with COVID-19." in d


@pytest.mark.shared_data
def test_real_file_with_ambiguous(builder):
    a = ad.read_h5ad(data_path("soupx_pbmc4k.h5ad"), backed="r")
    d = builder.build(a.obs)
    assert d["ambiguous"].sum() == (a.obs["cell_type_original"] == "?").sum() == 20
    assert (d.loc[d["ambiguous"], "description"] == "").all()
    assert (d.loc[~d["ambiguous"], "cell_type_id"] != "").all()
    assert d.loc[~d["ambiguous"], "description"].str.contains("Sampled from the blood").all()


@pytest.mark.parametrize("value", [None, np.nan, "?", "Unknown", " other ", "unassigned", ""])
def test_ambiguous_values(value):
    assert is_ambiguous(value)


def test_not_ambiguous():
    assert not is_ambiguous("B cell")


def test_text_key_and_missing_columns(builder):
    obs = pd.DataFrame({"cell_type": ["B cell", "T cell"], "note": ["a cell that makes antibodies", np.nan]})
    d = DescriptionBuilder(DescriptionConfig(text_key="note")).build(obs)
    assert d["description"].tolist() == ["a cell that makes antibodies", ""]
    assert d["ambiguous"].tolist() == [False, True]
    with pytest.raises(InputDataError, match="no column 'celltype'.*label_key"):
        DescriptionBuilder(DescriptionConfig(cell_type_key="celltype")).build(obs)
    with pytest.raises(InputDataError, match="text_key"):
        DescriptionBuilder(DescriptionConfig(text_key="nope")).build(obs)
