"""Refresh the README's screenshots from the real app.

Runs the browser end-to-end test (which drives every tab and saves a full-page screenshot of each
step), then stores a compact copy of each tab's screenshot in docs/screenshots/.

    .venv/bin/python scripts/update_screenshots.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TABS = {"01-dataset.png": "dataset", "02-captions.png": "captions", "03-config.png": "config",
        "04-train.png": "train", "05-test.png": "test"}
MAX_HEIGHT = 2000  # px of the page kept from the top
WIDTH = 1100


def main() -> int:
    # The page's header shows the workspace: one that reads as ~/lora-gui-demo/workspace, made and removed here.
    demo = Path.home() / "lora-gui-demo"
    if demo.exists():
        print(f"{demo} exists; move it away first (the screenshots use that folder and delete it).", file=sys.stderr)
        return 1
    try:
        return shoot(demo / "workspace")
    finally:
        shutil.rmtree(demo, ignore_errors=True)


def shoot(workspace: Path) -> int:
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "LORA_GUI_TEST_ARTIFACTS": folder, "LORA_GUI_E2E_WORKSPACE": str(workspace)}
        test = [sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_e2e_browser.py")]
        if subprocess.run(test, cwd=ROOT, env=env).returncode != 0:
            print("The browser test failed; screenshots were not updated.", file=sys.stderr)
            return 1
        out = ROOT / "docs" / "screenshots"
        out.mkdir(parents=True, exist_ok=True)
        for source, name in TABS.items():
            with Image.open(Path(folder) / source) as shot:
                page = shot.convert("RGB").crop((0, 0, shot.width, min(shot.height, MAX_HEIGHT)))
                page = page.resize((WIDTH, round(page.height * WIDTH / page.width)), Image.LANCZOS)
                page.save(out / f"{name}.jpg", quality=82, optimize=True)
            print(f"wrote {out / name}.jpg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
