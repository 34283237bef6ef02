"""The explorer end to end in a real browser: headless Chromium driven by Playwright against the
running server (uvicorn, the real shipped model, held-out PBMCs). It searches "B cell" and sees
cells light up, annotates with three labels and reads the legend, generates pseudo-cells and sees
them on the map, and takes a screenshot that must not be blank (the README shows it)."""

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from scmmgpt.explorer import ExplorerSession
from scmmgpt.explorer.server import serve

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "explorer.png"


def _chromium() -> str | None:
    return os.environ.get("SCMMGPT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(pbmc_small_lm, held_out_cells):
    port = _free_port()
    srv = serve(ExplorerSession.open(held_out_cells.copy(), pbmc_small_lm), port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    srv.thread.join(10)


def test_explorer_in_headless_chromium(server, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium here: .ci/run installs Debian's chromium (apt-get install chromium)")
    from PIL import Image
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"])
        page = browser.new_page(viewport={"width": 1400, "height": 850})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server)
        page.wait_for_function("window.explorer && window.explorer.ready", timeout=60_000)
        assert page.evaluate("window.explorer.n") == 262
        # coloured by cell type at first: a legend of the 9 types
        assert len(page.locator("#legend .item").all()) == 9

        page.fill("#query", "B cell")
        page.click("#searchBtn")
        page.wait_for_function("window.explorer.highlighted > 0", timeout=60_000)
        assert page.locator("#hits li").count() == 50
        assert not page.locator("#hist").is_hidden()
        lit = page.evaluate("window.explorer.highlighted")
        assert 0 < lit < 262

        page.fill("#labels", "B cell\nnatural killer cell\nCD14-positive monocyte")
        page.select_option("#truth", "cell_type")
        page.click("#annotateBtn")
        page.wait_for_function("window.explorer.legend.length >= 2 && window.explorer.legend[0] !== undefined "
                               "&& document.querySelector('#counts tr') !== null", timeout=60_000)
        legend = page.evaluate("window.explorer.legend")
        assert set(legend) <= {"B cell", "natural killer cell", "CD14-positive monocyte", "unassigned"}
        assert {"B cell", "natural killer cell", "CD14-positive monocyte"} <= set(legend)
        assert page.locator("#confusion table").count() == 1

        page.fill("#genText", "natural killer cell")
        page.fill("#genN", "12")
        page.click("#genBtn")
        page.wait_for_function("window.explorer.generated.length === 1", timeout=300_000)
        assert page.evaluate("window.explorer.genXY.length") == 24
        assert not page.locator("#genDownload").is_hidden()

        shot = tmp_path / "explorer.png"
        page.screenshot(path=str(shot))
        browser.close()
    img = np.asarray(Image.open(shot).convert("RGB"))
    # not blank: the map's points and the panels' text give many colours and non-white pixels
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    assert (img.min(axis=2) < 200).mean() > 0.01
    assert not errors, errors
    if os.environ.get("SCMMGPT_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(shot, SCREENSHOT)
