"""Real browser: `fedllm dashboard` as a subprocess, each page rendered by headless Chromium,
screenshotted (non-blank) and checked for its key text. Screenshots are kept in the test's temp
folder; with FEDLLM_SAVE_SCREENSHOTS=1 they are also written to docs/dashboard-<page>.png."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .browser import CHROMIUM

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)"),
    pytest.mark.timeout(900),  # includes the shared tiny run when this test sets it up
]

# url path, text that must be rendered (beyond the page title)
PAGES = {
    "runs": ("", "Selected: "),
    "utility": ("utility", "Global model on the held-out set"),
    "privacy": ("privacy", "No secure aggregation."),
    "bias": ("bias", "Bias metrics of the latest evaluated model"),
    "audit": ("audit", "Participation per round"),
}
TITLES = {"runs": "Runs", "utility": "Utility", "privacy": "Privacy budget", "bias": "Bias",
          "audit": "Audit"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fedllm dashboard exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"dashboard not serving at {url} after {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the dashboard and its streamlit child (their own process group, started here)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _distinct_colours(png: Path) -> int:
    from PIL import Image

    with Image.open(png) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 24)
    return len(colours or [])


def test_dashboard_in_chromium(tiny_run: dict, tmp_path: Path) -> None:
    pytest.importorskip("websockets.sync.client")
    from .browser import Browser

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "dashboard.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedllm.cli", "dashboard", "--home", str(tiny_run["home"]),
         "--port", str(port), "--address", "127.0.0.1"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    browser = None
    texts: dict[str, str] = {}
    try:
        _wait_healthy(url, proc, timeout=90)
        browser = Browser(tmp_path / "chromium-profile")
        for page, (path, expect) in PAGES.items():
            text = browser.open(f"{url}/{path}?run={tiny_run['run_id']}",
                                [TITLES[page], expect, tiny_run["run_id"]])
            assert "Traceback" not in text and "Error" not in text.split("\n", 1)[0]
            shot = tmp_path / f"dashboard-{page}.png"
            browser.screenshot(shot)
            assert shot.stat().st_size > 10_000
            # rendered text and charts use hundreds of colours; a blank page or the
            # loading skeleton uses a handful
            assert _distinct_colours(shot) > 200, f"{page} screenshot looks blank"
            if os.environ.get("FEDLLM_SAVE_SCREENSHOTS") == "1":
                DOCS.mkdir(exist_ok=True)
                (DOCS / shot.name).write_bytes(shot.read_bytes())
            texts[page] = text
        # store values are on screen (tables draw on a canvas; metrics are text)
        status = tiny_run["status"]
        max_eps = max(n["epsilon"] for rd in status["rounds"] for n in rd["nodes"])
        assert f"Max ε spent (any node)\n\n{max_eps:.3f}" in texts["privacy"]
        accuracy = status["rounds"][-1]["metrics"]["accuracy"]
        assert f"Final accuracy\n\n{accuracy:.4f}" in texts["runs"]
        assert f"Final accuracy\n\n{accuracy:.4f}" in texts["utility"]
    finally:
        if browser is not None:
            browser.close()
        _stop(proc)
        log.close()
    assert proc.returncode is not None
