#!/usr/bin/env bash
# Install on first run, then start LoRA GUI.
#   ./launch.sh [--port N] [--listen] [--share] [--auth user:pass] [--workspace DIR]
#   ./launch.sh test [pytest arguments]     installs the test extras and runs the test suite
set -euo pipefail
cd "$(dirname "$0")"

VENV="${LORA_GUI_VENV:-.venv}"
TORCH_VERSION="${LORA_GUI_TORCH_VERSION:-2.13.0}"
CUDA_INDEX="${LORA_GUI_CUDA_INDEX:-https://download.pytorch.org/whl/cu128}"
CPU_INDEX="https://download.pytorch.org/whl/cpu"

say() { printf '\033[1m[lora-gui]\033[0m %s\n' "$*"; }
fail() { printf '\033[31m[lora-gui] %s\033[0m\n' "$*" >&2; exit 1; }

find_python() {
    for candidate in python3.12 python3.11 python3.10 python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 &&
           "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}

create_venv() {
    [ -x "$VENV/bin/python" ] && return 0
    local python
    python="$(find_python)" || fail "Python 3.10 or newer is needed. Install it (python.org or your package manager) and run this again."
    say "Creating a virtual environment in $VENV with $($python --version)"
    "$python" -m venv "$VENV" || fail "Could not create $VENV. On Debian/Ubuntu install python3-venv first."
}

install_torch() {
    if "$PY" -c 'import torch' >/dev/null 2>&1; then return 0; fi
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        say "NVIDIA GPU found: installing PyTorch with CUDA (a large download, once)"
        "$PY" -m pip install "torch==$TORCH_VERSION" --index-url "$CUDA_INDEX" --extra-index-url https://pypi.org/simple ||
            "$PY" -m pip install "torch==$TORCH_VERSION"
    elif [ "$(uname -s)" = "Linux" ]; then
        say "No NVIDIA GPU found: installing the CPU build of PyTorch"
        "$PY" -m pip install --retries 1 "torch==$TORCH_VERSION" --index-url "$CPU_INDEX"
    else
        say "Installing PyTorch"
        "$PY" -m pip install "torch==$TORCH_VERSION"
    fi
}

install_project() {
    local extras="$1" stamp="$VENV/.lora-gui-installed-$1"
    local fingerprint
    fingerprint="$(cat pyproject.toml | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ]; then return 0; fi
    say "Installing LoRA GUI and its libraries (first run only)"
    "$PY" -m pip install --upgrade pip >/dev/null 2>&1 || true
    install_torch
    if [ "$extras" = "app" ]; then
        "$PY" -m pip install -e .
    else
        "$PY" -m pip install -e ".[$extras]"
    fi
    echo "$fingerprint" > "$stamp"
}

ensure_browser() {
    # The end-to-end tests drive the app in Debian's Chromium through Playwright.
    if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then return 0; fi
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        say "Installing Chromium for the browser tests"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null ||
            say "Could not install Chromium: the browser tests will be skipped"
    else
        say "Chromium is not installed: the browser tests will be skipped (install the 'chromium' package to run them)"
    fi
}

create_venv
PY="$VENV/bin/python"

if [ "${1:-}" = "test" ]; then
    shift
    install_project test
    ensure_browser
    exec "$PY" -m pytest "$@"
fi

install_project app
exec "$PY" app.py "$@"
