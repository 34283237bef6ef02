"""What the explorer does, without the web: one dataset and one model, the map, and every action of
the page as a method that returns compact arrays. The server (:mod:`.server`) only adds HTTP.

Every action goes through the public ``tl`` functions: search and annotation score the Q-Former
query features that :func:`~scmmgpt.tl.embed` stores once (``queries=True``; ``use_rep``), so a
search over 10^5 cells is a matrix product rather than a pass of the cell encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import InputDataError

logger = logging.getLogger("scmmgpt")

FEATURES_KEY = "X_scmmgpt_queries"
LABEL_KEY = "scmmgpt_label"
SEARCH_KEY = "scmmgpt_search"


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask (each is checked, and a request over it gets a 4xx)."""

    max_query_chars: int = 500
    max_labels: int = 100
    max_label_chars: int = 200
    max_pseudo_cells: int = 200
    max_top: int = 500
    max_body_bytes: int = 64 * 1024


def _fingerprint(path: Path | None, model, read: dict) -> str:
    """Identifies (data file, model) for the cache: the file's size and mtime, the model's config."""
    h = hashlib.sha256()
    if path is not None:
        st = path.stat()
        h.update(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{sorted(read.items())}".encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(len(model.vocab)).encode())
    return h.hexdigest()[:16]


def _continuous(s: pd.Series) -> bool:
    return (not isinstance(s.dtype, pd.CategoricalDtype) and not pd.api.types.is_bool_dtype(s.dtype)
            and pd.api.types.is_numeric_dtype(s.dtype))


def _expression(adata, layer: str | None, use_raw: bool) -> tuple[object, pd.Index, np.ndarray | None]:
    """The matrix the model reads (``.X``, a layer, or ``.raw``), its gene names, and each cell's
    library size when it holds counts (:func:`~scmmgpt.data.values.detect_value_kind`, the test the
    ``tl`` functions apply): then genes are shown as log1p of counts per 10k, else as they are."""
    from ..data.values import detect_value_kind

    if use_raw:
        if adata.raw is None:
            raise InputDataError("use_raw: the data has no .raw.")
        X, names = adata.raw.X, adata.raw.var_names
    elif layer is not None:
        if layer not in adata.layers:
            raise InputDataError(f"No layer {layer!r} (layers: {list(adata.layers.keys())}).")
        X, names = adata.layers[layer], adata.var_names
    else:
        X, names = adata.X, adata.var_names
    library = np.asarray(X.sum(1), dtype=np.float64).ravel() if detect_value_kind(X) == "counts" else None
    return X, pd.Index(names), library


@dataclass
class ExplorerSession:
    """One dataset (an AnnData, and the ``.h5ad`` it came from when there is one) and one model.

    ``prepare()`` makes what the page needs once: the cells' query features (``tl.embed``) and the
    2-D map (``.obsm["X_umap"]`` when the data has one, else a UMAP of ``X_scmmgpt`` fitted here),
    both cached in ``<file>.scmmgpt-explore/`` beside the file so a restart is instant.
    """

    adata: object
    model: object
    path: Path | None = None
    cache_dir: Path | None = None
    limits: Limits = field(default_factory=Limits)
    read: dict = field(default_factory=dict)
    """How the model reads the data: ``layer``, ``use_raw``, ``gene_symbol_key`` (as in ``tl``)."""
    coords: np.ndarray | None = None
    map_source: str = ""
    reducer: object | None = None
    generated: dict[str, object] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # ----------------------------------------------------------------------------- set-up
    @classmethod
    def open(cls, data, model, *, cache: bool = True, limits: Limits | None = None, layer: str | None = None,
             use_raw: bool = False, gene_symbol_key: str | None = None) -> "ExplorerSession":
        """``data``: an AnnData or an ``.h5ad`` path; ``model``: a model or anything ``load_model`` takes;
        ``layer`` / ``use_raw`` / ``gene_symbol_key``: which matrix and gene names the model reads."""
        import anndata as ad

        import scmmgpt

        path = None
        if isinstance(data, (str, os.PathLike)):
            path = Path(data)
            if not path.is_file():
                raise InputDataError(f"No such file: {path}.")
            data = ad.read_h5ad(path)
        if not isinstance(data, ad.AnnData):
            raise InputDataError(f"explore takes an AnnData or an .h5ad path, not {type(data).__name__}.")
        if data.n_obs == 0:
            raise InputDataError("The data has no cells.")
        if not hasattr(model, "config"):
            model = scmmgpt.load_model(model)
        cache_dir = Path(str(path) + ".scmmgpt-explore") if (cache and path is not None) else None
        read = {"layer": layer, "use_raw": use_raw, "gene_symbol_key": gene_symbol_key}
        s = cls(data, model, path, cache_dir, limits or Limits(), read)
        s.prepare()
        return s

    def _cache(self, name: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{_fingerprint(self.path, self.model, self.read)}.{name}"

    def prepare(self) -> None:
        from .. import tl

        a = self.adata
        if FEATURES_KEY not in a.obsm:
            f = self._cache("embedding.npz")
            if f is not None and f.is_file():
                z = np.load(f)
                a.obsm["X_scmmgpt"], a.obsm[FEATURES_KEY] = z["cls"], z["queries"]
                a.uns.setdefault("scmmgpt", {})["embed"] = json.loads(str(z["report"]))
            else:
                logger.info("explore: embedding %d cells once (cached beside the file)", a.n_obs)
                tl.embed(a, self.model, queries=True, aligned=False, min_coverage=0.0, **self.read)
                if f is not None:
                    f.parent.mkdir(exist_ok=True)
                    np.savez(f, cls=a.obsm["X_scmmgpt"], queries=a.obsm[FEATURES_KEY],
                             report=json.dumps(a.uns["scmmgpt"]["embed"], default=str))
        self._expr, self._genes, self._library = _expression(a, self.read.get("layer"),
                                                             self.read.get("use_raw", False))
        # warm the text side once (the Cell Ontology's names for query expansion, the text tower's
        # kernels) so that the page's first search costs what the later ones do
        from ..data.label_texts import query_texts

        self.model.encode_texts(query_texts(["B cell"], expand=True), precision="fp32")
        if "X_umap" in a.obsm and np.asarray(a.obsm["X_umap"]).shape[1] >= 2:
            self.coords = np.asarray(a.obsm["X_umap"])[:, :2].astype(np.float32)
            self.map_source = "obsm['X_umap']"
            return
        f = self._cache("umap.pkl")
        if f is not None and f.is_file():
            with open(f, "rb") as fh:
                self.coords, self.reducer = pickle.load(fh)
        else:
            import umap

            x = np.nan_to_num(np.asarray(a.obsm["X_scmmgpt"], dtype=np.float32))
            logger.info("explore: fitting a UMAP of X_scmmgpt on %d cells (cached beside the file)", a.n_obs)
            self.reducer = umap.UMAP(n_neighbors=15, min_dist=0.3, random_state=0, low_memory=True).fit(x)
            self.coords = self.reducer.embedding_.astype(np.float32)
            if f is not None:
                f.parent.mkdir(exist_ok=True)
                with open(f, "wb") as fh:
                    pickle.dump((self.coords, self.reducer), fh)
        self.map_source = "UMAP of X_scmmgpt"

    # ----------------------------------------------------------------------------- reading
    def meta(self) -> dict:
        a = self.adata
        cols = []
        for c in a.obs.columns:
            s = a.obs[c]
            if _continuous(s):
                cols.append({"name": str(c), "kind": "continuous"})
            else:
                n = int(pd.Series(s).nunique())
                if n <= 1000:
                    cols.append({"name": str(c), "kind": "categorical", "n": n})
        return {"n_obs": int(a.n_obs), "n_vars": int(a.n_vars), "file": self.path.name if self.path else None,
                "map": self.map_source, "columns": cols, "model": repr(self.model).split("\n")[0][:200],
                "limits": self.limits.__dict__, "has_lm": self.model.lm is not None}

    def color_obs(self, column: str) -> dict:
        a = self.adata
        if column not in a.obs.columns:
            raise InputDataError(f"No obs column {column!r}.")
        s = a.obs[column]
        if _continuous(s):
            v = s.to_numpy(dtype=np.float32)
            return {"kind": "continuous", "values": v, "min": float(np.nanmin(v)), "max": float(np.nanmax(v))}
        cat = pd.Categorical(s.astype(str))
        return {"kind": "categorical", "codes": cat.codes.astype(np.uint16), "categories": list(cat.categories)}

    def gene_index(self, gene: str) -> int:
        names = self._genes
        if gene in names:
            return int(names.get_loc(gene))
        upper = pd.Index(names.str.upper())
        if gene.upper() in upper:
            return int(np.flatnonzero(upper == gene.upper())[0])
        raise InputDataError(f"No gene {gene!r} in the data's {len(names)} genes (var_names).")

    @property
    def _counts(self) -> bool:
        return self._library is not None

    def _shown(self, X: np.ndarray, rows) -> np.ndarray:
        """Dense values of ``rows`` as shown: log1p of counts per 10k for counts, else as they are."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float32))
        if self._library is None:
            return X
        return np.log1p(1e4 * X / np.maximum(self._library[rows], 1).reshape(-1, 1)).astype(np.float32)

    def _rows(self, rows) -> np.ndarray:
        X = self._expr[rows]
        return self._shown(X.toarray() if hasattr(X, "toarray") else X, rows)

    def color_gene(self, gene: str) -> dict:
        j = self.gene_index(gene)
        col = self._expr[:, [j]]
        v = self._shown(col.toarray() if hasattr(col, "toarray") else col, slice(None)).ravel()
        return {"kind": "continuous", "values": v, "min": float(v.min()), "max": float(v.max()),
                "gene": str(self._genes[j])}

    def cell(self, i: int, *, n_genes: int = 10) -> dict:
        self.check_cell(i)
        a = self.adata
        x = self._rows([i])[0]
        top = np.argsort(-x)[:n_genes]
        out = {"index": i, "obs_name": str(a.obs_names[i]),
               "obs": {str(k): (None if pd.isna(v) else (v.item() if hasattr(v, "item") else str(v)))
                       for k, v in a.obs.iloc[i].items()},
               "top_genes": [[str(self._genes[j]), round(float(x[j]), 3)] for j in top if x[j] > 0]}
        if LABEL_KEY + "_topk" in a.obsm:
            labels = a.obsm[LABEL_KEY + "_topk"].iloc[i].tolist()
            scores = np.asarray(a.obsm[LABEL_KEY + "_topk_score"])[i].tolist()
            out["top_labels"] = [[str(lab), round(float(s), 4)] for lab, s in zip(labels, scores) if lab]
        return out

    # ----------------------------------------------------------------------------- actions
    def check_cell(self, i: int) -> None:
        if not 0 <= i < self.adata.n_obs:
            raise InputDataError(f"No cell {i}: the data has {self.adata.n_obs}.")

    def _text(self, text: str, empty: str, what: str) -> str:
        text = (text or "").strip()
        if not text:
            raise InputDataError(empty)
        if len(text) > self.limits.max_query_chars:
            raise InputDataError(f"The {what} has {len(text)} characters; at most {self.limits.max_query_chars}.")
        return text

    def search(self, query: str, top: int = 50) -> dict:
        from .. import tl

        query = self._text(query, "The search needs a query text.", "query")
        _bounded("top", top, self.limits.max_top)
        with self.lock:
            hits = tl.search(self.adata, self.model, query, top_k=top, key_added=SEARCH_KEY, use_rep=FEATURES_KEY)
        scores = self.adata.obs[SEARCH_KEY].to_numpy(dtype=np.float32)
        index = self.adata.obs_names.get_indexer(hits["obs_name"])
        return {"scores": scores, "hits": [[int(i), str(n), round(float(s), 4)]
                                          for i, n, s in zip(index, hits["obs_name"], hits["score"])]}

    def annotate(self, labels: Sequence[str] | None = None, *, descendants_of: str | None = None,
                 min_score: float | None = None, truth: str | None = None) -> dict:
        from .. import tl

        labels = [str(x).strip() for x in (labels or []) if str(x).strip()]
        if bool(labels) == bool(descendants_of):
            raise InputDataError("Give candidate labels, or a Cell Ontology term in 'descendants of', not both.")
        if len(labels) > self.limits.max_labels:
            raise InputDataError(f"{len(labels)} labels; at most {self.limits.max_labels}.")
        if any(len(x) > self.limits.max_label_chars for x in labels):
            raise InputDataError(f"A label is longer than {self.limits.max_label_chars} characters.")
        if truth and truth not in self.adata.obs.columns:
            raise InputDataError(f"No obs column {truth!r} to compare with.")
        with self.lock:
            tl.annotate(self.adata, self.model, labels=labels or None, descendants_of=descendants_of or None,
                        min_score=min_score, key_added=LABEL_KEY, top_k=3, use_rep=FEATURES_KEY,
                        store_scores=False)
        pred = self.adata.obs[LABEL_KEY]
        cat = pd.Categorical(pred.astype(str))
        counts = pd.Series(cat).value_counts()
        out = {"codes": cat.codes.astype(np.uint16), "categories": list(cat.categories),
               "counts": [[str(k), int(v)] for k, v in counts.items()],
               "n_unassigned": int(self.adata.uns[LABEL_KEY]["n_unassigned"])}
        if truth:
            t = self.adata.obs[truth].astype(str)
            tab = pd.crosstab(t, pred.astype(str))
            out["confusion"] = {"rows": list(map(str, tab.index)), "columns": list(map(str, tab.columns)),
                                "counts": tab.to_numpy().astype(int).tolist(), "truth": truth}
        return out

    def describe(self, i: int) -> str:
        from .. import tl

        self.check_cell(i)
        if self.model.lm is None:
            raise InputDataError("This model was loaded without its language model: describe needs it.")
        one = self.adata[[i]].copy()
        for k in list(one.obsm.keys()):
            del one.obsm[k]
        with self.lock:
            tl.describe(one, self.model, max_new_tokens=48, min_coverage=0.0, **self.read)
        return str(one.obs["scmmgpt_description"].iloc[0])

    def generate(self, text: str, n: int = 20, *, seed: int = 0) -> dict:
        """``n`` pseudo-cells from ``text`` (``tl.generate``), placed on the map: through the fitted
        UMAP's ``transform`` when this session fitted it, else (a map given with the data) at the
        mean position of each pseudo-cell's 10 nearest real cells in the ``<cls>`` space."""
        from .. import tl

        text = self._text(text, "Generate needs a description.", "description")
        _bounded("n", n, self.limits.max_pseudo_cells)
        if self.model.lm is None:
            raise InputDataError("This model was loaded without its language model: generate needs it.")
        library = int(np.median(self._library)) if self._library is not None else 5000
        with self.lock:
            pseudo = tl.generate(self.model, text, n_per_text=n, library_size=library, seed=seed)
            tl.embed(pseudo, self.model, aligned=False)
        x = np.asarray(pseudo.obsm["X_scmmgpt"], dtype=np.float32)
        if self.reducer is not None:
            xy = np.asarray(self.reducer.transform(x), dtype=np.float32)
            how = "UMAP transform"
        else:
            from ..tl.transfer import nearest_neighbours

            ref = np.nan_to_num(np.asarray(self.adata.obsm["X_scmmgpt"], dtype=np.float32))
            nn, _, _ = nearest_neighbours(ref, x, 10, exact_max=len(ref))
            xy = self.coords[nn].mean(1).astype(np.float32)
            how = "mean position of the 10 nearest real cells (<cls> cosine)"
        key = hashlib.sha256(f"{text}:{n}:{seed}:{len(self.generated)}".encode()).hexdigest()[:12]
        pseudo.obsm["X_map"] = xy
        self.generated[key] = pseudo
        return {"id": key, "coords": xy, "n": int(n), "placed_by": how, "text": text}

    # ----------------------------------------------------------------------------- export
    def export_csv(self) -> bytes:
        a = self.adata
        cols = [c for c in a.obs.columns if c.startswith("scmmgpt")]
        if not cols:
            raise InputDataError("Nothing to export yet: annotate or search first.")
        return a.obs[cols].to_csv(index_label="obs_name").encode()

    def export_h5ad(self, key: str | None = None) -> bytes:
        """The data with its annotation (``key=None``), or generated pseudo-cells, as ``.h5ad`` bytes;
        the stored query features are left out (``tl.embed(queries=True)`` remakes them)."""
        if key is None:
            with self.lock:           # copy the data once, without its stored features (the largest part)
                features = self.adata.obsm.pop(FEATURES_KEY, None)
                try:
                    a = self.adata.copy()
                finally:
                    if features is not None:
                        self.adata.obsm[FEATURES_KEY] = features
        elif key in self.generated:
            a = self.generated[key].copy()
        else:
            raise InputDataError(f"No generated cells {key!r}.")
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "out.h5ad"
            _clean_uns(a).write_h5ad(f)
            return f.read_bytes()


def _bounded(name: str, value: int, most: int) -> None:
    if not 1 <= value <= most:
        raise InputDataError(f"{name} must be in [1, {most}].")


def _clean_uns(a):
    """h5ad cannot store every ``.uns`` value (None, mixed lists): store them as JSON text (in ``a``,
    a copy the caller owns)."""

    def fix(v):
        if isinstance(v, dict):
            return {str(k): fix(x) for k, x in v.items()}
        if v is None:
            return "none"
        if isinstance(v, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) or x is None for x in v):
            return json.dumps(v, default=str)
        return v

    a.uns = fix(dict(a.uns))
    return a


def encode_arrays(payload: dict) -> dict:
    """Numpy arrays in a response become ``{"dtype", "b64"}``: compact, typed, little-endian."""
    import base64

    out = {}
    for k, v in payload.items():
        if isinstance(v, np.ndarray):
            v = np.ascontiguousarray(v.astype(v.dtype.newbyteorder("<")))
            out[k] = {"dtype": v.dtype.name, "shape": list(v.shape), "b64": base64.b64encode(v.tobytes()).decode()}
        elif isinstance(v, dict):
            out[k] = encode_arrays(v)
        else:
            out[k] = v
    return out


__all__ = ["ExplorerSession", "Limits", "encode_arrays", "FEATURES_KEY"]
