"""Refresh the lock files: resolve, install into a temporary venv, run the suite, then (with --write) adopt.

    python scripts/lock.py                 newest allowed versions: what drifted, and does the suite pass?
    python scripts/lock.py --write         the same; when the suite passes, write the lock files
    python scripts/lock.py --keep --write  keep the current pins where pyproject.toml still allows them
                                           (after adding or changing a dependency)

The lock files are made by uv (``uv pip compile``, pinned below) from pyproject.toml's ranges, for every
platform and Python the project supports, with hashes. torch is left out: launch.sh and launch.bat pick
its build per machine. requirements-test.lock adds the test tools; requirements.lock is resolved inside
it, so both agree. Nothing in the tree changes unless the suite passed and --write was given.
The suite runs through ``launch.sh test`` itself, so the install path is the one users get.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lora_gui.versions import lock_pins  # noqa: E402 (stdlib only; works before anything is installed)

APP_LOCK, TEST_LOCK = "requirements.lock", "requirements-test.lock"
UV_VERSION = "0.13.9"
TOOLS = Path(os.environ.get("LORA_GUI_LOCK_TOOLS") or Path(tempfile.gettempdir()) / "lora-gui-lock-tools")
# torch comes from launch.sh per machine; a requirement that is never true drops it (and what only it needs).
TORCH_OVERRIDE = 'torch; sys_platform == "never"\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the lock files when the suite passes")
    parser.add_argument("--keep", action="store_true", help="keep current pins where still allowed")
    parser.add_argument("--pytest-args", default="", help="extra arguments for pytest")
    args = parser.parse_args(argv)

    uv = ensure_uv()
    work = Path(tempfile.mkdtemp(prefix="lora-gui-lock-"))
    print(f"Resolving {'with the current pins kept' if args.keep else 'the newest allowed versions'} in {work}")
    compile_locks(uv, work, keep=args.keep)
    report_drift(ROOT / TEST_LOCK, work / TEST_LOCK)
    passed = run_suite(work, args.pytest_args.split())
    print(f"\nSuite with the candidate lock: {'PASSED' if passed else 'FAILED'}")
    if not passed:
        print(f"The lock files were not changed. Candidate locks and venv: {work}")
        return 1
    if args.write:
        for name in (APP_LOCK, TEST_LOCK):
            shutil.copyfile(work / name, ROOT / name)
        print(f"Wrote {APP_LOCK} and {TEST_LOCK}; commit them with the suite's result.")
    else:
        print("Nothing written (add --write to adopt these versions).")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def ensure_uv() -> Path:
    """uv at the pinned version, in a venv of its own outside the project."""
    uv = TOOLS / ("Scripts/uv.exe" if os.name == "nt" else "bin/uv")
    if uv.exists() and UV_VERSION in subprocess.run([uv, "--version"], capture_output=True, text=True).stdout:
        return uv
    print(f"Installing uv {UV_VERSION} into {TOOLS}")
    subprocess.run([sys.executable, "-m", "venv", str(TOOLS)], check=True)
    python = TOOLS / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", f"uv=={UV_VERSION}"], check=True)
    return uv


def compile_locks(uv: Path, work: Path, keep: bool) -> None:
    override = work / "torch-override.txt"
    override.write_text(TORCH_OVERRIDE)
    if keep:  # uv keeps the pins already in the output file unless told to upgrade
        for name in (APP_LOCK, TEST_LOCK):
            if (ROOT / name).exists():
                shutil.copyfile(ROOT / name, work / name)
    common = [
        str(uv), "pip", "compile", str(ROOT / "pyproject.toml"), "--universal", "--fork-strategy", "fewest",
        "--override", str(override), "--no-emit-package", "torch", "--generate-hashes", "--quiet",
        "--custom-compile-command", "python scripts/lock.py --write", *([] if keep else ["--upgrade"]),
    ]
    subprocess.run([*common, "--extra", "test", "-o", str(work / TEST_LOCK)], check=True, cwd=ROOT)
    subprocess.run([*common, "--constraint", TEST_LOCK, "-o", APP_LOCK], check=True, cwd=work)


def report_drift(current_path: Path, candidate_path: Path) -> None:
    current, candidate = lock_pins(current_path), lock_pins(candidate_path)
    rows = []
    for name in sorted(set(current) | set(candidate)):
        old, new = ", ".join(sorted(current.get(name, ()))), ", ".join(sorted(candidate.get(name, ())))
        if old != new:
            rows.append((name, old or "(new)", new or "(dropped)"))
    if not rows:
        print(f"No drift: the candidate pins the same versions as {current_path.name}.")
        return
    print(f"Drift from {current_path.name} ({len(rows)} packages):")
    width = max(len(name) for name, _, _ in rows)
    for name, old, new in rows:
        print(f"  {name:<{width}}  {old:>14}  ->  {new}")


def run_suite(work: Path, pytest_args: list[str]) -> bool:
    """``launch.sh test`` in a fresh venv that installs the candidate locks."""
    env = {**os.environ, "LORA_GUI_VENV": str(work / "venv"),
           "LORA_GUI_APP_LOCK": str(work / APP_LOCK), "LORA_GUI_TEST_LOCK": str(work / TEST_LOCK)}
    launcher = ["cmd", "/c", str(ROOT / "launch.bat")] if os.name == "nt" else ["bash", str(ROOT / "launch.sh")]
    print(f"Installing the candidate into {work / 'venv'} and running the suite (several minutes)")
    return subprocess.run([*launcher, "test", *pytest_args], cwd=ROOT, env=env).returncode == 0


if __name__ == "__main__":
    sys.exit(main())
