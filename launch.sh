#!/usr/bin/env bash
# Install on first run (the tested versions in requirements.lock), then start LoRA GUI.
#   ./launch.sh [--port N] [--listen] [--share] [--auth user:pass] [--workspace DIR]
#   ./launch.sh test [pytest arguments]     installs the test lock and runs the test suite
#   ./launch.sh --version                   what is installed (app, torch/CUDA, libraries)
set -euo pipefail
cd "$(dirname "$0")"

VENV="${LORA_GUI_VENV:-.venv}"
TORCH_VERSION="${LORA_GUI_TORCH_VERSION:-2.13.0}"
# Linux GPU machines take torch from PyPI (a CUDA 13.0 build); LORA_GUI_CUDA_INDEX picks another build.
CUDA_INDEX="${LORA_GUI_CUDA_INDEX:-}"
CPU_INDEX="https://download.pytorch.org/whl/cpu"
APP_LOCK="${LORA_GUI_APP_LOCK:-requirements.lock}"
TEST_LOCK="${LORA_GUI_TEST_LOCK:-requirements-test.lock}"

say() { printf '\033[1m[lora-gui]\033[0m %s\n' "$*"; }
fail() { printf '\033[31m[lora-gui] %s\033[0m\n' "$*" >&2; exit 1; }

find_python() {
    for candidate in python3.11 python3.12 python3.13 python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 &&
           "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}

create_venv() {
    [ -x "$VENV/bin/python" ] && return 0
    local python
    python="$(find_python)" || fail "Python 3.11 or newer is needed. Install it (python.org or your package manager) and run this again."
    say "Creating a virtual environment in $VENV with $($python --version)"
    "$python" -m venv "$VENV" || fail "Could not create $VENV. On Debian/Ubuntu install python3-venv first."
}

reachable() {
    "$PY" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=8).close()
EOF
}

install_torch() {
    if "$PY" -c 'import torch' >/dev/null 2>&1; then return 0; fi
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        say "NVIDIA GPU found: installing PyTorch $TORCH_VERSION with CUDA (a large download, once)"
        if [ -n "$CUDA_INDEX" ]; then
            "$PY" -m pip install "torch==$TORCH_VERSION" --index-url "$CUDA_INDEX"
        else
            "$PY" -m pip install "torch==$TORCH_VERSION"
        fi
    elif [ "$(uname -s)" = "Linux" ] && reachable "$CPU_INDEX/torch/"; then
        say "No NVIDIA GPU found: installing the CPU build of PyTorch $TORCH_VERSION"
        "$PY" -m pip install "torch==$TORCH_VERSION" --index-url "$CPU_INDEX"
    else
        say "Installing PyTorch $TORCH_VERSION"
        "$PY" -m pip install "torch==$TORCH_VERSION"
    fi
}

fingerprint() {
    cat pyproject.toml "$1" | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

install_locked() {
    local mode="$1" lock="$2" stamp="$VENV/.lora-gui-installed-$1"
    [ -f "$lock" ] || fail "$lock is missing: this checkout is incomplete. Clone the project again."
    local print
    print="$(fingerprint "$lock")"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$print" ]; then return 0; fi
    say "Installing LoRA GUI with the tested library versions from $lock (first run, or the lock changed)"
    install_torch || fail "Installing PyTorch failed; see the messages above. Check the connection and run this again."
    "$PY" -m pip install -qq --require-hashes --only-binary :all: -r "$lock" ||
        fail "Installing the locked libraries failed; see the messages above. Check the connection and run this again."
    "$PY" -m pip install -qq --no-deps -e . ||
        fail "Installing LoRA GUI itself failed; see the messages above."
    if ! "$PY" -m pip check >/dev/null 2>&1; then
        "$PY" -m pip check || true
        fail "The installed libraries do not fit together (above). Delete $VENV and run this again."
    fi
    echo "$print" > "$stamp"
    say "Installed: $("$PY" -m lora_gui --version | sed -n 1,3p | tr '\n' ' ')"
}

ensure_browser() {
    # The end-to-end tests drive the app in Debian's Chromium through Playwright.
    if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then return 0; fi
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        say "Installing Chromium for the browser tests"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 ||
            say "Could not install Chromium: the browser tests will be skipped"
    else
        say "Chromium is not installed: the browser tests will be skipped (install the 'chromium' package to run them)"
    fi
}

create_venv
PY="$VENV/bin/python"
# The app's --version and the tests compare what is installed with these.
export LORA_GUI_APP_LOCK="$(cd "$(dirname "$APP_LOCK")" && pwd)/$(basename "$APP_LOCK")"
export LORA_GUI_TEST_LOCK="$(cd "$(dirname "$TEST_LOCK")" && pwd)/$(basename "$TEST_LOCK")"

if [ "${1:-}" = "test" ]; then
    shift
    install_locked test "$TEST_LOCK"
    ensure_browser
    export LORA_GUI_INSTALLED_LOCK="$LORA_GUI_TEST_LOCK"
    exec "$PY" -m pytest "$@"
fi

install_locked app "$APP_LOCK"
if [ "${1:-}" = "--version" ]; then exec "$PY" -m lora_gui --version; fi
exec "$PY" app.py "$@"
