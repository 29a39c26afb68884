"""Starting the real app in its own process, as a user's double-click does, for browser tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_app(workspace: Path, log_path: Path, *extra: str):
    """``python app.py`` on a free port; yields its URL and stops it afterwards."""
    port = free_port()
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, str(root / "app.py"), "--port", str(port), "--workspace", str(workspace),
             "--no-browser", *extra],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
        )
        url = f"http://127.0.0.1:{port}/"
        try:
            wait_until_serving(url, process, log_path)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_until_serving(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The app exited early:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"The app did not start in {timeout:.0f} s:\n{log_path.read_text()[-4000:]}")


def call(url: str, api: str, data: list) -> str:
    """One call through /gradio_api/call; the event stream's whole text (result or error)."""
    request = urllib.request.Request(f"{url}gradio_api/call/{api}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        event = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api}/{event}", timeout=300) as response:
        return response.read().decode()


@contextmanager
def serving(build, **launch):
    """A gr.Blocks built by ``build()`` on a real local server in this process; yields its URL."""
    import gradio as gr

    with gr.Blocks() as demo:
        build()
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, **launch)
    try:
        yield url
    finally:
        demo.close()
