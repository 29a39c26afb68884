"""The lock files, the installed set, and the version report a bug report quotes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from lora_gui import versions

ROOT = Path(__file__).resolve().parent.parent
HASHED_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s*;[^\\]*)?\s*\\\n((?:\s+--hash=sha256:[0-9a-f]{64}\s*\\?\n)+)",
                        re.MULTILINE)


def lock_path(name: str) -> Path:
    """The lock launch.sh installed from (a candidate lock while scripts/lock.py tries one)."""
    variable = {"requirements.lock": "LORA_GUI_APP_LOCK", "requirements-test.lock": "LORA_GUI_TEST_LOCK"}[name]
    return Path(os.environ.get(variable) or ROOT / name)


def project_requirements(extra: str | None = None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + (project["optional-dependencies"][extra] if extra else [])
    return [Requirement(text) for text in names]


@pytest.mark.parametrize(("lock", "extra"), [("requirements.lock", None), ("requirements-test.lock", "test")])
def test_lock_pins_every_requirement_within_its_range(lock, extra):
    path = lock_path(lock)
    pins = versions.read_lock(path)
    assert "torch" not in pins and "torch" not in versions.lock_pins(path), "torch is installed per machine, not locked"
    for requirement in project_requirements(extra):
        name = versions.normalize(requirement.name)
        if name == "torch" or (requirement.marker and not requirement.marker.evaluate()):
            continue
        assert name in pins, f"{lock} has no pin for {requirement}: run python scripts/lock.py --keep --write"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{lock} pins {name}=={pins[name]}, outside pyproject.toml's {requirement}")


@pytest.mark.parametrize("lock", ["requirements.lock", "requirements-test.lock"])
def test_every_pin_carries_hashes(lock):
    text = lock_path(lock).read_text()
    pinned = [line for line in text.splitlines() if versions.PIN.match(line.strip())]
    hashed = HASHED_PIN.findall(text)
    assert pinned and len(hashed) == len(pinned), "every pin needs its --hash lines (pip's --require-hashes)"


def test_app_lock_agrees_with_the_test_lock():
    app, test = versions.lock_pins(lock_path("requirements.lock")), versions.lock_pins(lock_path("requirements-test.lock"))
    for name, pinned in app.items():
        assert test.get(name) == pinned, f"{name}: app lock {pinned}, test lock {test.get(name)}"
    assert set(test) - set(app) >= {"pytest", "playwright"}


def test_installed_packages_are_the_locked_ones():
    lock = os.environ.get("LORA_GUI_INSTALLED_LOCK")
    if not lock:
        pytest.skip("not started through ./launch.sh test, which says which lock it installed")
    differences = versions.lock_differences(Path(lock))
    assert not differences, f"installed versions differ from {lock}: {differences}"


def test_read_lock_applies_markers(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text(
        "alpha==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"
        "beta==2.0 ; sys_platform == 'never' \\\n    --hash=sha256:" + "1" * 64 + "\n"
        "Gamma_Pkg==3.1 ; python_full_version >= '3.11' \\\n    --hash=sha256:" + "2" * 64 + "\n"
        "    # via something\n"
    )
    assert versions.read_lock(lock) == {"alpha": "1.0", "gamma-pkg": "3.1"}


def test_gpu_support_follows_the_builds_architectures():
    blackwell_build = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert versions.gpu_supported_by_build(12, 0, blackwell_build)  # RTX 50-series
    assert versions.gpu_supported_by_build(8, 9, blackwell_build)  # RTX 40-series runs sm_86 code
    assert not versions.gpu_supported_by_build(6, 1, blackwell_build)  # GTX 10-series
    assert not versions.gpu_supported_by_build(12, 0, ["sm_80", "sm_86", "sm_90"])
    assert versions.gpu_supported_by_build(12, 0, ["sm_80", "sm_90", "compute_90"])  # PTX
    assert not versions.gpu_supported_by_build(8, 0, ["sm_86"])


def test_version_command_names_what_ran():
    result = subprocess.run([sys.executable, "-m", "lora_gui", "--version"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert lines[0] == f"lora-gui {project['version']}"
    import torch

    assert any(line.startswith(f"torch {torch.__version__} (") for line in lines)
    expected_build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    assert expected_build in result.stdout
    for name in ("diffusers", "transformers", "peft", "accelerate", "gradio"):
        assert f"{name} {versions.installed_version(name)}" in lines
    lock = lock_path("requirements.lock").name
    assert re.search(rf"^(installed set matches|differs from) {re.escape(lock)}", result.stdout, re.MULTILINE)
