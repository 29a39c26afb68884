"""What ran: the app's version, the libraries it trains with, and the GPU PyTorch sees.

``lora-gui --version`` prints it and the app's About panel shows it, so a bug report says exactly
which versions were installed. The lock files list the tested set; ``lock_differences`` names every
installed package that is not the locked version.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

APP_DISTRIBUTION = "lora-gui"
REPORTED_LIBRARIES = (
    "diffusers", "transformers", "peft", "accelerate", "gradio",
    "bitsandbytes", "optimum-quanto", "safetensors", "huggingface-hub",
)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
APP_LOCK = "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def app_version() -> str:
    return installed_version(APP_DISTRIBUTION) or "unknown (not installed; run ./launch.sh)"


@dataclass(frozen=True)
class TorchBuild:
    version: str
    cuda: str | None  # the CUDA version the build was made for; None: a CPU (or MPS) build
    gpu: str | None  # "NVIDIA GeForce RTX 4090 (sm_89)" when a CUDA GPU is visible
    gpu_supported: bool | None  # whether this build has kernels for that GPU; None without one

    def describe(self) -> str:
        if self.cuda is None:
            return f"torch {self.version} (CPU build, no CUDA)"
        text = f"torch {self.version} (CUDA {self.cuda})"
        if self.gpu is None:
            return f"{text}, no CUDA GPU visible"
        if self.gpu_supported is False:
            return (f"{text}, GPU {self.gpu}: NOT supported by this build; see README, "
                    "'Which NVIDIA GPUs the PyTorch build supports'")
        return f"{text}, GPU {self.gpu}"


# On Linux a CUDA (or ROCm) device needs its driver: NVIDIA's, AMD's kfd, or WSL's GPU bridge.
GPU_DRIVER_MARKERS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def no_gpu_driver() -> bool:
    """Whether this is a Linux machine with no GPU driver at all, so torch need not be imported to know."""
    return sys.platform.startswith("linux") and not any(os.path.exists(marker) for marker in GPU_DRIVER_MARKERS)


def torch_build() -> TorchBuild | None:
    """PyTorch's version, CUDA build and visible GPU; None when torch is not installed. Without a GPU driver
    it is read from torch's version file instead of importing torch (seconds)."""
    if "torch" not in sys.modules and no_gpu_driver():
        written = _torch_version_file()
        if written is not None:
            return TorchBuild(written.get("__version__", "?"), written.get("cuda"), None, None)
    try:
        import torch
    except ImportError:
        return None
    cuda = torch.version.cuda
    gpu = supported = None
    if cuda and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        gpu = f"{torch.cuda.get_device_name(0)} (sm_{major}{minor})"
        supported = gpu_supported_by_build(major, minor, torch.cuda.get_arch_list())
    return TorchBuild(torch.__version__, cuda, gpu, supported)


def _torch_version_file() -> dict | None:
    """The constants of an installed torch's ``version.py`` (``__version__``, ``cuda``), or None."""
    import ast
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
        folder = Path(next(iter(spec.submodule_search_locations or [])))
        tree = ast.parse((folder / "version.py").read_text(encoding="utf-8"))
    except (ImportError, StopIteration, AttributeError, OSError, SyntaxError, ValueError):
        return None
    found = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            found[target.id] = value.value
    return found if "__version__" in found else None


def gpu_supported_by_build(major: int, minor: int, arch_list: list[str]) -> bool:
    """Whether a build compiled for ``arch_list`` (``sm_86``, ``compute_90``...) runs on sm_<major><minor>.

    A cubin runs on its own major version at an equal or higher minor; PTX (``compute_XY``) is compiled
    by the driver for any GPU at least that new.
    """
    wanted = major * 10 + minor
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        if not number.isdigit():
            continue
        built = int(number)
        if kind == "sm" and built // 10 == major and built <= wanted:
            return True
        if kind == "compute" and built <= wanted:
            return True
    return False


def version_report() -> list[str]:
    """Lines naming the app, Python, PyTorch with its CUDA build and GPU, and the key libraries."""
    lines = [f"{APP_DISTRIBUTION} {app_version()}",
             f"Python {platform.python_version()} ({platform.system()} {platform.machine()})"]
    build = torch_build()
    lines.append(build.describe() if build else "torch not installed")
    for name in REPORTED_LIBRARIES:
        lines.append(f"{name} {installed_version(name) or 'not installed'}")
    lock = find_lock_file()
    if lock is not None:
        differences = lock_differences(lock)
        if differences:
            lines.append(f"differs from {lock.name}: " + ", ".join(differences))
        else:
            lines.append(f"installed set matches {lock.name}")
    return lines


# ----------------------------------------------------------------------------- lock files


def find_lock_file() -> Path | None:
    """The app's lock launch.sh installed (both installs include it: the test lock only adds to it)."""
    path = Path(os.environ.get("LORA_GUI_APP_LOCK") or PROJECT_ROOT / APP_LOCK)
    return path if path.is_file() else None


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """``{normalized name: version}`` for the pins of a requirements lock that apply to this Python."""
    from packaging.markers import Marker

    pins: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        match = PIN.match(line.strip())
        if not match:
            continue
        name, version, marker = match.groups()
        if marker and not Marker(marker).evaluate():
            continue
        pins[normalize(name)] = version
    return pins


def lock_pins(path: Path) -> dict[str, set[str]]:
    """Every version a lock names per package, whatever the platform or Python (empty for no file)."""
    pins: dict[str, set[str]] = {}
    if not Path(path).exists():
        return pins
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        match = PIN.match(line.strip())
        if match and "never" not in (match.group(3) or ""):  # what only torch needs (see scripts/lock.py)
            pins.setdefault(normalize(match.group(1)), set()).add(match.group(2))
    return pins


def lock_differences(path: Path) -> list[str]:
    """``"name installed (lock X)"`` for every locked package whose installed version differs."""
    differences = []
    for name, locked in sorted(read_lock(path).items()):
        installed = installed_version(name)
        if installed != locked:
            differences.append(f"{name} {installed or 'missing'} (lock {locked})")
    return differences
