"""`fedllm dashboard` -> dashboard.launch: command line and environment handed to Streamlit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dashboard import launch as launch_mod


def test_streamlit_command() -> None:
    cmd = launch_mod.streamlit_command(8600, "0.0.0.0")
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert Path(cmd[4]) == launch_mod.APP and launch_mod.APP.exists()
    opts = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert opts["--server.port"] == "8600"
    assert opts["--server.address"] == "0.0.0.0"
    assert opts["--server.headless"] == "true"
    assert opts["--browser.gatherUsageStats"] == "false"


def test_launch_passes_home_and_returns_exit_code(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}

    class FakePopen:
        def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
            seen["cmd"], seen["env"] = cmd, env

        def wait(self, timeout: float | None = None) -> int:
            return 3

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    assert launch_mod.launch(home=tmp_path, port=8601, address="127.0.0.1") == 3
    assert seen["env"]["FEDLLM_HOME"] == str(tmp_path.resolve())
    assert "8601" in seen["cmd"]


def test_cli_dashboard_help() -> None:
    out = subprocess.run([sys.executable, "-m", "fedllm.cli", "dashboard", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "--port" in out.stdout and "--home" in out.stdout
