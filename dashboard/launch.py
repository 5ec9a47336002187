"""Start the Streamlit dashboard as a subprocess (used by ``fedllm dashboard``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"
HOME_ENV = "FEDLLM_HOME"


def streamlit_command(port: int, address: str) -> list[str]:
    """The ``streamlit run`` command line for the dashboard app."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.port", str(port),
        "--server.address", address,
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--client.toolbarMode", "minimal",
    ]


def launch(home: Path, port: int = 8501, address: str = "127.0.0.1") -> int:
    """Serve the dashboard over the run store in ``home`` until interrupted; the exit code."""
    env = {**os.environ, HOME_ENV: str(Path(home).expanduser().resolve())}
    print(f"fedllm dashboard: http://{address}:{port}  (run store: {env[HOME_ENV]})", flush=True)
    proc = subprocess.Popen(streamlit_command(port, address), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 130
