"""The explorer at 100k cells: time to first paint, time to the first search's answer on the page,
and the server's memory, measured in headless Chromium (Playwright) against ``scmmgpt explore``.

The 100k cells are real PBMCs repeated: muscat_kang_se's 12,261 cells (``--data``, any .h5ad with
counts) drawn with replacement to ``--cells``, each copy with its own name; the map that comes with
the data (``.obsm["X_umap"]``) is the file's t-SNE (or a 2-D PCA) with a little jitter per copy. The
server is started twice: the first start embeds every cell once (``tl.embed(queries=True)``) and
caches it beside the file, the second reads the cache; the page figures come from the second, which
is what a user sees on every start after the first.

Run: ``python benchmarks/explore.py [--data ../shared/data/muscat_kang_se.h5ad] [--cells 100000]``.
Writes ``benchmarks/results/explore/results.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def build(src: Path, n: int, out: Path, seed: int = 0) -> Path:
    import anndata as ad
    import scipy.sparse as sp

    a = ad.read_h5ad(src)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.n_obs, n)
    b = a[idx].copy()
    b.obs_names = [f"{name}-{i}" for i, name in enumerate(a.obs_names[idx])]
    if {"tsne1", "tsne2"} <= set(a.obs.columns):
        xy = a.obs[["tsne1", "tsne2"]].to_numpy(np.float32)
    else:
        x = np.log1p(a.X.toarray() if sp.issparse(a.X) else a.X)
        x -= x.mean(0)
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        xy = (u[:, :2] * s[:2]).astype(np.float32)
    spread = xy.std(0) * 0.01
    b.obsm["X_umap"] = xy[idx] + rng.normal(size=(n, 2)).astype(np.float32) * spread
    b.write_h5ad(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: Path, model: str, port: int, log: Path):
    cmd = [sys.executable, "-m", "scmmgpt", "explore", str(path), "--model", model, "--port", str(port)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.25)
    return proc, time.perf_counter() - t0


def rss_mib(pid: int) -> float:
    import psutil

    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20


def page_figures(url: str, chromium: str, query: str) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"])
        page = browser.new_page(viewport={"width": 1400, "height": 850})
        t0 = time.perf_counter()
        page.goto(url)
        page.wait_for_function("window.explorer && window.explorer.ready", timeout=120_000, polling=20)
        first_paint = time.perf_counter() - t0
        n = page.evaluate("window.explorer.n")
        # pan / zoom smoothness: one redraw of every point, finished, averaged over 30 frames
        frame_ms = page.evaluate("(() => { const t = performance.now(); for (let i = 0; i < 30; i++) "
                                 "{ window.explorer.scale *= 1.01; window.explorer.frame(); } "
                                 "return (performance.now() - t) / 30; })()")
        times = []
        for q in (query, "natural killer cell"):
            page.fill("#query", q)
            page.evaluate("window.explorer.lastSearchMs = null")
            t0 = time.perf_counter()
            page.click("#searchBtn")
            page.wait_for_function("window.explorer.lastSearchMs !== null && window.explorer.highlighted > 0",
                                   timeout=120_000, polling=20)
            times.append(time.perf_counter() - t0)
        search, second = times
        browser.close()
    return {"n_cells_drawn": n, "frame_ms": round(frame_ms, 1), "first_paint_s": round(first_paint, 3), "first_search_s": round(search, 3),
            "second_search_s": round(second, 3)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "muscat_kang_se.h5ad"))
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--model", default="pbmc-small")
    ap.add_argument("--query", default="B cell")
    ap.add_argument("--work", default=str(ROOT / "runs" / "explore-bench"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "explore" / "results.json"))
    ap.add_argument("--reuse", action="store_true",
                    help="keep the built file and its cache from the last run: measure the later start and the "
                         "page only (the first start's time is carried over from --out)")
    args = ap.parse_args(argv)
    chromium = os.environ.get("SCMMGPT_CHROMIUM") or shutil.which("chromium")
    if chromium is None:
        raise SystemExit("needs Chromium: apt-get install chromium (or set SCMMGPT_CHROMIUM)")
    work = Path(args.work)
    path = work / f"cells_{args.cells}.h5ad"
    rec: dict = {"cells": args.cells, "data": Path(args.data).name, "model": args.model}
    runs = ("cold", "warm")
    if args.reuse and path.is_file() and Path(args.out).is_file():
        runs = ("warm",)
        rec["cold_start_s"] = json.loads(Path(args.out).read_text())["cold_start_s"]
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        build(Path(args.data), args.cells, path)
        print(f"built {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    for run in runs:
        port = free_port()
        proc, up = start_server(path, args.model, port, work / f"server_{run}.log")
        try:
            rec[f"{run}_start_s"] = round(up, 1)
            print(f"{run} start: {up:.1f} s", flush=True)
            if run == "warm":
                rec.update(page_figures(f"http://127.0.0.1:{port}/", chromium, args.query))
                rec["server_rss_mib"] = round(rss_mib(proc.pid), 1)
        finally:
            proc.terminate()
            proc.wait(30)
    from scmmgpt.tasks.benchmark import machine_info

    rec["machine"] = machine_info()
    rec["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rec["command"] = "python benchmarks/explore.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2))
    print("\n| cells | first start (embeds, caches) | later start | first paint | first search | next search | "
          "redraw (pan / zoom) | server memory |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.cells:,} | {rec['cold_start_s']} s | {rec['warm_start_s']} s | {rec['first_paint_s']} s | "
          f"{rec['first_search_s']} s | {rec['second_search_s']} s | {rec['frame_ms']} ms | "
          f"{rec['server_rss_mib']:.0f} MiB |")
    return rec


if __name__ == "__main__":
    main()
