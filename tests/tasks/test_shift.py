"""The reference-mapping / out-of-distribution protocol: source -> target shifts, scored at the target's resolution."""

import json

import numpy as np
import pytest

from scmmgpt.cli.main import main
from scmmgpt.errors import InputDataError
from scmmgpt.tasks.shift import MAPPING_SHIFTS, METHODS, OOD_SHIFTS, parse_shift, to_target_labels
from tests.conftest import data_path

TARGET = {"CD4-positive, alpha-beta T cell": "CL:0000624", "B cell": "CL:0000236",
          "mononuclear phagocyte": "CL:0000113"}


def test_a_finer_source_label_counts_as_the_target_label_above_it():
    src = {"naive thymus-derived CD4-positive, alpha-beta T cell": "CL:0000895", "B cell": "CL:0000236",
           "CD14-positive monocyte": "CL:0001054", "platelet": "CL:0000233",
           "CD8-positive, alpha-beta T cell": "CL:0000625"}
    got = to_target_labels(list(src), src, TARGET)
    assert list(got) == ["CD4-positive, alpha-beta T cell", "B cell", "mononuclear phagocyte",
                         "platelet",                            # below no target label: stays, and is wrong
                         "CD8-positive, alpha-beta T cell"]     # a sibling, not a descendant: stays
    # the most specific target ancestor wins when several are targets
    both = {**TARGET, "T cell": "CL:0000084"}
    assert to_target_labels(["naive thymus-derived CD4-positive, alpha-beta T cell"], src, both)[0] == \
        "CD4-positive, alpha-beta T cell"


def test_parse_shift(tmp_path):
    f = tmp_path / "a.h5ad"
    f.write_bytes(b"")
    s = parse_shift("a.h5ad:batch=x,y>a.h5ad:batch=z", tmp_path)
    assert s.source == s.target == str(f) and s.source_where == ("batch", ("x", "y"))
    assert s.target_where == ("batch", ("z",)) and s.describe() == "a[batch in x, y] -> a[batch in z]"
    with pytest.raises(InputDataError, match="SRC"):
        parse_shift("a.h5ad", tmp_path)
    with pytest.raises(InputDataError, match="No such file"):
        parse_shift("a.h5ad>b.h5ad", tmp_path)
    with pytest.raises(InputDataError, match="COL=V1,V2"):
        parse_shift("a.h5ad:batch>a.h5ad", tmp_path)


@pytest.mark.shared_data
def test_ood_benchmark_cli_leaves_the_target_out(tmp_path, capsys):
    data_path("symphony_pbmcs_small.h5ad")
    out = tmp_path / "ood"
    spec = "symphony_pbmcs_small.h5ad:batch=3pv1>symphony_pbmcs_small.h5ad:batch=5p"
    assert main(["benchmark", "ood", "--fast", "--data-dir", str(data_path("symphony_pbmcs_small.h5ad").parent),
                 "--shift", spec, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    rec = json.loads((out / "results.json").read_text())
    (res,) = rec["results"].values()
    (run,) = res["runs"]
    # every source cell of 3'v1 trains, every labelled 5' cell is scored, none of them trained on
    assert (run["n_source_cells"], run["n_target_cells"]) == (290, 430)
    assert set(run["scores"]) == {key for key, _ in METHODS}
    for key, label in METHODS:
        assert 0 <= run["scores"][key]["acc1"] <= 1 and label in table
    # the supervised reference reads the right cells with the right labels: far above the majority class
    assert run["scores"]["logreg"]["acc1"] > 0.85
    # a shift naming a column the file lacks: exit status 2 and an error that names the columns there are
    assert main(["benchmark", "ood", "--fast", "--data-dir", str(data_path("symphony_pbmcs_small.h5ad").parent),
                 "--shift", "symphony_pbmcs_small.h5ad:chemistry=5p>symphony_pbmcs_small.h5ad", "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no obs column 'chemistry'" in err and "'batch'" in err
    assert np.isfinite(run["gene_coverage"])


@pytest.mark.shared_data
@pytest.mark.parametrize("spec", [*MAPPING_SHIFTS, *OOD_SHIFTS])
def test_the_suite_shifts_select_labelled_cells_the_source_can_name(spec):
    """Every default shift parses against the shared data, each restricted side keeps cells, and every
    target type has a source type at or below it in the Cell Ontology (else no method could be right)."""
    import anndata as ad

    s = parse_shift(spec, data_path("pbmc3k_clustifyr.h5ad").parent)
    sides = []
    for path, where in ((s.source, s.source_where), (s.target, s.target_where)):
        a = ad.read_h5ad(path, backed="r")
        keep = np.ones(a.n_obs, bool) if where is None else a.obs[where[0]].astype(str).isin(where[1]).to_numpy()
        assert keep.sum() > 100
        obs = a.obs[keep & a.obs["cell_type"].notna().to_numpy()]          # unlabelled cells are not scored
        sides.append(dict(zip(obs["cell_type"].astype(str), obs["cell_type_ontology_term_id"].astype(str))))
    src, tgt = sides
    named = set(to_target_labels(list(src), src, tgt))
    assert set(tgt) <= named, set(tgt) - named
