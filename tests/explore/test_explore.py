"""The explorer's session and HTTP API on real held-out PBMCs with the real shipped model: the same
answers as the tl functions, bounded requests answered 4xx with a message, the server still up
after them, jobs for the slow calls, exports that read back, local binding by default."""

import base64
import io
import json
import time

import anndata as ad
import numpy as np
import pytest

from scmmgpt import tl
from scmmgpt.errors import ConfigError, InputDataError
from scmmgpt.explorer import ExplorerSession
from scmmgpt.explorer.server import check_host, create_app


def _arr(a):
    return np.frombuffer(base64.b64decode(a["b64"]), dtype=a["dtype"]).reshape(a["shape"])


@pytest.fixture(scope="module")
def session(pbmc_small_lm, held_out_cells):
    return ExplorerSession.open(held_out_cells.copy(), pbmc_small_lm)


@pytest.fixture(scope="module")
def client(session):
    from starlette.testclient import TestClient

    with TestClient(create_app(session)) as c:
        yield c


def _wait(client, job, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = client.get(f"/api/job/{job}").json()
        if st["state"] in ("done", "error"):
            return st
        time.sleep(0.2)
    raise AssertionError("job did not finish")


def test_page_meta_map_and_colours(client, session, held_out_cells):
    page = client.get("/")
    assert page.status_code == 200 and "scMMGPT explorer" in page.text and "/static/app.js" in page.text
    for name in ("app.js", "app.css"):                       # every asset is served here: no CDN, no remote URL
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and "://" not in asset.text
    assert "://" not in page.text
    meta = client.get("/api/meta").json()
    n = held_out_cells.n_obs
    assert meta["n_obs"] == n and meta["map"] == "obsm['X_umap']"
    assert {"name": "cell_type", "kind": "categorical", "n": 9} in meta["columns"]
    xy = client.get("/api/coords")
    assert xy.headers["content-type"] == "application/octet-stream" and len(xy.content) == n * 2 * 4
    np.testing.assert_allclose(np.frombuffer(xy.content, "<f4").reshape(n, 2), held_out_cells.obsm["X_umap"])
    cat = client.get("/api/color", params={"obs": "cell_type"}).json()
    codes = _arr(cat["codes"])
    assert cat["kind"] == "categorical" and len(codes) == n
    assert np.array(cat["categories"])[codes].tolist() == held_out_cells.obs["cell_type"].astype(str).tolist()
    gene = client.get("/api/color", params={"gene": "cd79a"}).json()      # case-insensitive gene names
    v = _arr(gene["values"])
    assert gene["gene"] == "CD79A" and v.shape == (n,) and np.isfinite(v).all()
    b = held_out_cells.obs["cell_type"].astype(str).to_numpy() == "B cell"
    assert v[b].mean() > 5 * v[~b].mean()                                  # CD79A marks the B cells


def test_search_is_tl_search_on_stored_features(client, session, held_out_cells, pbmc_small_lm):
    r = client.post("/api/search", json={"query": "B cell", "top": 20})
    assert r.status_code == 200
    out = r.json()
    scores = _arr(out["scores"])
    truth = held_out_cells.obs["cell_type"].astype(str).to_numpy()
    hits = [h[0] for h in out["hits"]]
    assert len(hits) == 20 and np.mean(truth[hits] == "B cell") >= 0.8      # the B cells light up
    # the same scores as tl.search running the cell encoder, up to the features' float16 storage
    a = held_out_cells.copy()
    tl.search(a, pbmc_small_lm, "B cell", key_added="s", precision="fp32")
    np.testing.assert_allclose(scores, a.obs["s"].to_numpy(), atol=5e-3)


def test_annotate_colours_counts_and_confusion(client, session, held_out_cells, pbmc_small_lm):
    labels = ["B cell", "natural killer cell", "CD14-positive monocyte"]
    r = client.post("/api/annotate", json={"labels": labels, "truth": "cell_type"})
    assert r.status_code == 200, r.text
    out = r.json()
    codes = _arr(out["codes"])
    pred = np.array(out["categories"])[codes]
    assert set(out["categories"]) <= set(labels) | {"unassigned"} and len(pred) == held_out_cells.n_obs
    assert sum(c for _, c in out["counts"]) == held_out_cells.n_obs
    conf = out["confusion"]
    assert conf["truth"] == "cell_type" and np.sum(conf["counts"]) == held_out_cells.n_obs
    assert conf["counts"][conf["rows"].index("B cell")][conf["columns"].index("B cell")] >= 25     # of 30
    # the labels tl.annotate gives when it runs the cell encoder
    a = held_out_cells.copy()
    tl.annotate(a, pbmc_small_lm, labels=labels, precision="fp32")
    assert np.mean(a.obs["scmmgpt_label"].astype(str).to_numpy() == pred) >= 0.99
    cell = client.get("/api/cell/0").json()
    assert [lab for lab, _ in cell["top_labels"]][0] == pred[0] and len(cell["top_labels"]) == 3
    assert cell["top_genes"] and cell["obs"]["cell_type"] == held_out_cells.obs["cell_type"].iloc[0]
    csv = client.get("/api/export.csv")
    assert csv.status_code == 200 and csv.text.splitlines()[0].startswith("obs_name,") and "scmmgpt_label" in csv.text
    back = ad.read_h5ad(io.BytesIO(client.get("/api/export.h5ad").content))
    assert back.obs["scmmgpt_label"].astype(str).tolist() == pred.tolist()
    assert "X_scmmgpt_queries" not in back.obsm


def test_describe_and_generate_run_as_jobs(client, session, held_out_cells):
    job = client.post("/api/describe", json={"cell": 3}).json()["job"]
    st = _wait(client, job)
    assert st["state"] == "done" and len(st["result"]) > 20 and st["elapsed_s"] > 0
    job = client.post("/api/generate", json={"text": "natural killer cell", "n": 6}).json()["job"]
    st = _wait(client, job)
    assert st["state"] == "done", st
    res = st["result"]
    xy = _arr(res["coords"])
    assert xy.shape == (6, 2) and np.isfinite(xy).all() and res["placed_by"].startswith("mean position")
    # placed among the real cells: inside the map's bounding box
    lo, hi = held_out_cells.obsm["X_umap"].min(0), held_out_cells.obsm["X_umap"].max(0)
    assert ((xy >= lo) & (xy <= hi)).all()
    pseudo = ad.read_h5ad(io.BytesIO(client.get(f"/api/generated/{res['id']}.h5ad").content))
    assert pseudo.n_obs == 6 and "counts" in pseudo.layers and pseudo.obs["prompt"].iloc[0] == "natural killer cell"


@pytest.mark.parametrize("method, path, payload, status, message", [
    ("post", "/api/search", {"query": "x" * 501}, 400, "at most 500"),
    ("post", "/api/search", {"query": ""}, 400, "needs a query"),
    ("post", "/api/search", {"query": 3}, 400, "must be str"),
    ("post", "/api/search", {"query": "B cell", "top": 10_000}, 400, "top must be"),
    ("post", "/api/annotate", {"labels": [f"type {i}" for i in range(101)]}, 400, "at most 100"),
    ("post", "/api/annotate", {"labels": []}, 400, "Give candidate labels"),
    ("post", "/api/annotate", {"labels": ["B cell"], "truth": "nope"}, 400, "No obs column 'nope'"),
    ("post", "/api/generate", {"text": "B cell", "n": 201}, 400, "n must be in"),
    ("post", "/api/describe", {"cell": 10**6}, 400, "No cell"),
    ("get", "/api/cell/999999", None, 400, "No cell"),
    ("get", "/api/cell/abc", None, 400, "row number"),
    ("get", "/api/color?obs=nope", None, 400, "No obs column"),
    ("get", "/api/color?gene=NOTAGENE", None, 400, "No gene 'NOTAGENE'"),
    ("get", "/api/job/unknown", None, 404, "No such job"),
    ("get", "/api/generated/unknown.h5ad", None, 400, "No generated cells"),
    ("get", "/nothing/here", None, 404, "Not Found"),
    ("get", "/static/../session.py", None, 404, ""),
])
def test_bad_requests_get_a_4xx_with_a_message(client, method, path, payload, status, message):
    r = getattr(client, method)(path, **({"json": payload} if payload is not None else {}))
    assert r.status_code == status, (r.status_code, r.text)
    if message:
        assert message in r.json()["error"]
    assert client.get("/api/meta").status_code == 200                       # still serving


def test_body_limits_and_malformed_json(client):
    big = json.dumps({"query": "B cell", "pad": "x" * 70_000})
    r = client.post("/api/search", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "at most 65536" in r.json()["error"]
    r = client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = client.post("/api/search", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON object" in r.json()["error"]


def test_binds_locally_unless_told(tmp_path, capsys):
    from scmmgpt.cli.main import main

    check_host("127.0.0.1", False)
    check_host("0.0.0.0", True)
    with pytest.raises(ConfigError, match="--allow-remote"):
        check_host("0.0.0.0", False)
    f = tmp_path / "x.h5ad"
    assert main(["explore", str(f), "--host", "0.0.0.0", "--model", "pbmc-small"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert main(["explore", str(f), "--model", "pbmc-small"]) == 2
    assert "No such file" in capsys.readouterr().err


def test_embedding_is_cached_beside_the_file(tmp_path, held_out_cells, pbmc_small_lm, monkeypatch):
    f = tmp_path / "cells.h5ad"
    held_out_cells.write_h5ad(f)
    first = ExplorerSession.open(f, pbmc_small_lm)
    cached = list((tmp_path / "cells.h5ad.scmmgpt-explore").iterdir())
    assert [p.suffix for p in cached] == [".npz"]
    # a second start reads the cache: no pass of the cell encoder
    monkeypatch.setattr(tl, "embed", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-embedded")))
    second = ExplorerSession.open(f, pbmc_small_lm)
    np.testing.assert_array_equal(first.adata.obsm["X_scmmgpt_queries"], second.adata.obsm["X_scmmgpt_queries"])
    assert second.search("B cell")["hits"] == first.search("B cell")["hits"]
    with pytest.raises(InputDataError, match="No such file"):
        ExplorerSession.open(tmp_path / "none.h5ad", pbmc_small_lm)


@pytest.mark.slow  # umap-learn's numba kernels compile on first use (about a minute on a 2-core CPU)
def test_without_a_map_a_umap_is_fitted_cached_and_used_for_pseudo_cells(tmp_path, held_out_cells, pbmc_small_lm):
    a = held_out_cells.copy()
    del a.obsm["X_umap"]
    f = tmp_path / "cells.h5ad"
    a.write_h5ad(f)
    s = ExplorerSession.open(f, pbmc_small_lm)
    assert s.map_source == "UMAP of X_scmmgpt" and s.coords.shape == (a.n_obs, 2) and s.reducer is not None
    assert sorted(p.suffix for p in (tmp_path / "cells.h5ad.scmmgpt-explore").iterdir()) == [".npz", ".pkl"]
    again = ExplorerSession.open(f, pbmc_small_lm)
    np.testing.assert_array_equal(again.coords, s.coords)
    g = s.generate("B cell", 4)
    assert g["placed_by"] == "UMAP transform" and np.isfinite(g["coords"]).all()


def test_use_rep_in_tl(held_out_cells, pbmc_small_lm):
    """tl.search / tl.annotate with use_rep score the features tl.embed(queries=True) stored."""
    a = held_out_cells.copy()
    tl.embed(a, pbmc_small_lm, queries=True, precision="fp32")
    q = a.obsm["X_scmmgpt_queries"]
    assert q.dtype == np.float16 and q.shape == (a.n_obs, 8, 256)
    with pytest.raises(InputDataError, match="alpha > 0"):
        tl.annotate(a, pbmc_small_lm, labels=["B cell", "T cell"], use_rep="X_scmmgpt_queries", alpha=0.5)
    with pytest.raises(InputDataError, match="queries=True"):
        tl.search(a, pbmc_small_lm, "B cell", use_rep="X_nothing")
    with pytest.raises(InputDataError, match="shape"):
        b = a.copy()
        b.obsm["X_bad"] = np.zeros((a.n_obs, 3, 4), np.float16)
        tl.search(b, pbmc_small_lm, "B cell", use_rep="X_bad")


def test_reads_raw_as_the_tl_functions_do(pbmc68k, pbmc_small_lm):
    """scanpy's pbmc68k_reduced: scaled values in .X (which no count model can read), log-normalised
    values in .raw, a UMAP in .obsm: the explorer reads .raw like tl does with use_raw."""
    a = pbmc68k.copy()
    with pytest.raises(InputDataError):
        ExplorerSession.open(a.copy(), pbmc_small_lm)
    s = ExplorerSession.open(a, pbmc_small_lm, use_raw=True)
    assert s.map_source == "obsm['X_umap']" and s.adata.obsm["X_scmmgpt_queries"].shape[0] == a.n_obs
    v = s.color_gene("CD79A")["values"]
    assert v.shape == (a.n_obs,) and not s._counts
    np.testing.assert_allclose(v, a.raw[:, "CD79A"].X.toarray().ravel(), rtol=1e-6)
    b = a.obs["bulk_labels"].astype(str).to_numpy() == "CD19+ B"
    hits = [i for i, _, _ in s.search("B cell", top=20)["hits"]]
    assert np.mean(b[hits]) >= 0.8


def test_scmmgpt_explore_starts_the_app_from_python(held_out_cells, pbmc_small_lm):
    """``scmmgpt.explore(adata, model, block=False)``: the notebook path, a running server."""
    import httpx

    import scmmgpt

    with pytest.raises(ConfigError, match="allow-remote"):
        scmmgpt.explore(held_out_cells, pbmc_small_lm, host="0.0.0.0", block=False)
    srv = scmmgpt.explore(held_out_cells.copy(), pbmc_small_lm, port=0, block=False)
    try:
        port = srv.servers[0].sockets[0].getsockname()[1]
        assert httpx.get(f"http://127.0.0.1:{port}/api/meta").json()["n_obs"] == held_out_cells.n_obs
    finally:
        srv.should_exit = True
        srv.thread.join(10)
