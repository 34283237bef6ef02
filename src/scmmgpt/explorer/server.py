"""The explorer's HTTP side (Starlette + uvicorn): static page, JSON/binary API over an
:class:`~.session.ExplorerSession`, slow calls (describe, generate) as background jobs the page
polls, bounded requests, a 4xx with a message for every bad one.

Binding: 127.0.0.1 by default; another host only with ``allow_remote`` (the page runs a model on
request and has no authentication). The server reads no file but its static assets and the data it
was started with; no request names a path.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputDataError
from .session import ExplorerSession, _bounded, encode_arrays

logger = logging.getLogger("scmmgpt")

STATIC = Path(__file__).parent / "static"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_host(host: str, allow_remote: bool) -> None:
    if host not in LOCAL_HOSTS and not allow_remote:
        raise ConfigError(f"--host {host} would serve the explorer (which runs the model on request, with no "
                          "authentication) beyond this machine; pass --allow-remote to do so on purpose.")


class Jobs:
    """Background jobs, one at a time (the model is shared), with their state for the page to poll."""

    def __init__(self, keep: int = 64):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scmmgpt-job")
        self._jobs: dict[str, dict] = {}
        self._keep = keep
        self._lock = threading.Lock()

    def submit(self, kind: str, fn, *args) -> str:
        key = uuid.uuid4().hex[:12]
        job = {"id": key, "kind": kind, "state": "queued", "submitted": time.time(), "started": None}
        with self._lock:
            self._jobs[key] = job
            for old in list(self._jobs)[:-self._keep]:
                del self._jobs[old]

        def run():
            job["state"], job["started"] = "running", time.time()
            try:
                job["result"] = fn(*args)
                job["state"] = "done"
            except InputDataError as e:
                job["state"], job["error"] = "error", str(e)
            except Exception as e:  # a failed job is reported to the page; the server keeps running
                logger.exception("explore job %s failed", kind)
                job["state"], job["error"] = "error", f"{type(e).__name__}: {e}"
            job["finished"] = time.time()

        self._pool.submit(run)
        return key

    def status(self, key: str) -> dict | None:
        job = self._jobs.get(key)
        if job is None:
            return None
        now = job.get("finished") or time.time()
        out = {k: v for k, v in job.items() if k in ("id", "kind", "state", "error")}
        out["elapsed_s"] = round(now - (job["started"] or now), 2)
        if job["state"] == "done":
            out["result"] = job["result"]
        return out


def create_app(session: ExplorerSession):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    jobs = Jobs()
    limits = session.limits

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def body(request: Request) -> dict:
        size = int(request.headers.get("content-length") or 0)
        if size > limits.max_body_bytes:
            raise InputDataError(f"The request body has {size} bytes; at most {limits.max_body_bytes}.")
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            raise InputDataError(f"The request body has {len(raw)} bytes; at most {limits.max_body_bytes}.")
        try:
            data = json.loads(raw or b"{}")
        except ValueError as e:
            raise InputDataError(f"The request body is not JSON: {e}.") from None
        if not isinstance(data, dict):
            raise InputDataError("The request body must be a JSON object.")
        return data

    def field(data: dict, name: str, kind, default=None, required: bool = False):
        if name not in data or data[name] is None:
            if required:
                raise InputDataError(f"Missing {name!r}.")
            return default
        v = data[name]
        if kind is int and isinstance(v, bool) or not isinstance(v, kind):
            raise InputDataError(f"{name!r} must be {getattr(kind, '__name__', kind)}, not {type(v).__name__}.")
        return v

    def api(fn):
        async def endpoint(request: Request):
            try:
                return await fn(request)
            except (InputDataError, ConfigError) as e:
                return error(400, str(e))
            except HTTPException:
                raise
            except Exception as e:  # report, keep serving
                logger.exception("explore: %s failed", request.url.path)
                return error(500, f"{type(e).__name__}: {e}")
        return endpoint

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def meta(request: Request):
        return JSONResponse(session.meta())

    async def coords(request: Request):
        xy = np.ascontiguousarray(session.coords, dtype="<f4")
        return Response(xy.tobytes(), media_type="application/octet-stream",
                        headers={"X-Shape": f"{xy.shape[0]},{xy.shape[1]}"})

    async def color(request: Request):
        q = request.query_params
        if "obs" in q:
            out = session.color_obs(q["obs"])
        elif "gene" in q:
            if len(q["gene"]) > 100:
                raise InputDataError("A gene name of at most 100 characters.")
            out = await run_in_threadpool(session.color_gene, q["gene"])
        else:
            raise InputDataError("Colour by ?obs=COLUMN or ?gene=NAME.")
        return JSONResponse(encode_arrays(out))

    async def cell(request: Request):
        try:
            i = int(request.path_params["i"])
        except ValueError:
            raise InputDataError("A cell is named by its row number.") from None
        return JSONResponse(session.cell(i))

    async def search(request: Request):
        data = await body(request)
        out = await run_in_threadpool(session.search, field(data, "query", str, required=True),
                                      field(data, "top", int, 50))
        return JSONResponse(encode_arrays(out))

    async def annotate(request: Request):
        data = await body(request)
        labels = field(data, "labels", list, [])
        if not all(isinstance(x, str) for x in labels):
            raise InputDataError("'labels' must be a list of texts.")
        min_score = field(data, "min_score", (int, float))
        out = await run_in_threadpool(lambda: session.annotate(
            labels, descendants_of=field(data, "descendants_of", str), truth=field(data, "truth", str),
            min_score=None if min_score is None else float(min_score)))
        return JSONResponse(encode_arrays(out))

    async def describe(request: Request):
        data = await body(request)
        i = field(data, "cell", int, required=True)
        session.check_cell(i)                      # refused now, not in the job
        return JSONResponse({"job": jobs.submit("describe", session.describe, i)})

    async def generate(request: Request):
        data = await body(request)
        text = field(data, "text", str, required=True)
        n = field(data, "n", int, 20)
        session._text(text, "Generate needs a description.", "description")      # refused now, not in the job
        _bounded("n", n, limits.max_pseudo_cells)
        return JSONResponse({"job": jobs.submit("generate", lambda: encode_arrays(session.generate(text, n)))})

    async def job(request: Request):
        st = jobs.status(request.path_params["key"])
        if st is None:
            return error(404, "No such job.")
        return JSONResponse(st)

    async def generated(request: Request):
        data = await run_in_threadpool(session.export_h5ad, request.path_params["key"])
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": 'attachment; filename="pseudo_cells.h5ad"'})

    async def export_csv(request: Request):
        return Response(session.export_csv(), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="scmmgpt_annotation.csv"'})

    async def export_h5ad(request: Request):
        data = await run_in_threadpool(session.export_h5ad)
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": 'attachment; filename="scmmgpt_annotated.h5ad"'})

    async def not_found(request: Request, exc):
        return error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "Not found.")

    routes = [
        Route("/", index),
        Route("/api/meta", api(meta)),
        Route("/api/coords", api(coords)),
        Route("/api/color", api(color)),
        Route("/api/cell/{i}", api(cell)),
        Route("/api/search", api(search), methods=["POST"]),
        Route("/api/annotate", api(annotate), methods=["POST"]),
        Route("/api/describe", api(describe), methods=["POST"]),
        Route("/api/generate", api(generate), methods=["POST"]),
        Route("/api/job/{key}", api(job)),
        Route("/api/generated/{key}.h5ad", api(generated)),
        Route("/api/export.csv", api(export_csv)),
        Route("/api/export.h5ad", api(export_h5ad)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def serve(session: ExplorerSession, *, host: str = "127.0.0.1", port: int = 8000, allow_remote: bool = False,
          block: bool = True, log_level: str = "warning"):
    """Run the app with uvicorn. ``block=False`` starts it in a thread and returns the
    ``uvicorn.Server`` once it listens (``server.should_exit = True`` stops it)."""
    import uvicorn

    check_host(host, allow_remote)
    config = uvicorn.Config(create_app(session), host=host, port=port, log_level=log_level, access_log=False)
    server = uvicorn.Server(config)
    if block:
        print(f"scmmgpt explore: http://{host}:{port}/  ({session.adata.n_obs} cells; Ctrl-C stops)", flush=True)
        server.run()
        return server
    thread = threading.Thread(target=server.run, daemon=True, name="scmmgpt-explore")
    thread.start()
    t0 = time.time()
    while not server.started:
        if not thread.is_alive() or time.time() - t0 > 30:
            raise ConfigError(f"The explorer could not start on {host}:{port} (is the port in use?).")
        time.sleep(0.05)
    server.thread = thread  # type: ignore[attr-defined]
    return server
