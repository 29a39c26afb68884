"""Seconds from launching the app to its first page: ``python app.py`` in a fresh process, until the page
and its config (what the browser fetches first) answer. For scale, it also times ``import gradio`` alone in a
fresh process (the part no change to the app can shorten) and reports the app's own share (the difference).

    python bench/first_page.py               # 3 launches, one line each and the median
    python bench/first_page.py --runs 5
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def first_page_seconds(workspace: Path) -> float:
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--no-browser",
                                "--workspace", str(workspace)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError("the app exited before serving")
            try:
                for path in ("", "config"):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=5) as response:
                        response.read()
                return time.perf_counter() - started
            except OSError:
                time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(timeout=30)


def gradio_import_seconds() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import gradio"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        times, imports = [], []
        for run in range(args.runs):
            seconds = first_page_seconds(Path(folder) / "workspace")
            imported = gradio_import_seconds()
            times.append(seconds)
            imports.append(imported)
            print(f"launch {run + 1}: first page after {seconds:.2f} s; import gradio alone {imported:.2f} s",
                  flush=True)
    page, gradio = statistics.median(times), statistics.median(imports)
    print(f"median over {len(times)} launches: first page {page:.2f} s, import gradio alone {gradio:.2f} s, "
          f"the app's own share {page - gradio:.2f} s")


if __name__ == "__main__":
    main()
