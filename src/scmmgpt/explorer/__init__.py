"""The explorer: a local web app over one dataset and one model (``scmmgpt explore cells.h5ad``, or
:func:`explore` from Python or a notebook). A map of the cells, text search, zero-shot annotation,
one cell's genes, labels and description, pseudo-cells from a description on the same map, and
export; every asset ships in the package, nothing is fetched from the network."""

from __future__ import annotations

from .session import ExplorerSession, Limits

__all__ = ["explore", "ExplorerSession", "Limits"]


def explore(adata, model="pbmc-small", *, port: int = 8000, host: str = "127.0.0.1", allow_remote: bool = False,
            block: bool = True, cache: bool = True, layer: str | None = None, use_raw: bool = False,
            gene_symbol_key: str | None = None):
    """Start the explorer on ``adata`` (an AnnData or an ``.h5ad`` path) with ``model`` (a model, a
    saved folder, or a name ``load_model`` takes; default the shipped ``pbmc-small``).

    The cells are embedded once (``tl.embed(queries=True)``) and a UMAP of ``X_scmmgpt`` is fitted
    unless ``.obsm["X_umap"]`` exists; for an ``.h5ad`` both are cached beside the file
    (``<file>.scmmgpt-explore/``). It binds to ``127.0.0.1``; another ``host`` needs
    ``allow_remote=True``. ``layer`` / ``use_raw`` / ``gene_symbol_key`` choose the matrix and gene
    names the model reads, as in the ``tl`` functions.

    Returns
    -------
    With ``block=True`` (the CLI), when the server stops. With ``block=False`` (a notebook), the
    running ``uvicorn.Server`` (``server.should_exit = True`` stops it); the page is at
    ``http://{host}:{port}/``.
    """
    from .server import check_host, serve

    check_host(host, allow_remote)
    session = ExplorerSession.open(adata, model, cache=cache, layer=layer, use_raw=use_raw,
                                   gene_symbol_key=gene_symbol_key)
    return serve(session, host=host, port=port, allow_remote=allow_remote, block=block)
