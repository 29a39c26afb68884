@echo off
rem Install on first run, then start LoRA GUI.
rem   launch.bat [--port N] [--listen] [--share] [--auth user:pass] [--workspace DIR]
rem   launch.bat test [pytest arguments]
setlocal EnableDelayedExpansion
cd /d "%~dp0"
if "%LORA_GUI_VENV%"=="" (set "VENV=.venv") else (set "VENV=%LORA_GUI_VENV%")
if "%LORA_GUI_TORCH_VERSION%"=="" (set "TORCH_VERSION=2.13.0") else (set "TORCH_VERSION=%LORA_GUI_TORCH_VERSION%")
set "PY=%VENV%\Scripts\python.exe"

if not exist "%PY%" (
    where py >nul 2>nul && (py -3 -m venv "%VENV%") || (python -m venv "%VENV%")
    if not exist "%PY%" (
        echo [lora-gui] Python 3.10 or newer is needed. Install it from python.org, tick "Add to PATH", and run this again.
        pause
        exit /b 1
    )
)

set "MODE=app"
if /i "%~1"=="test" set "MODE=test"

set "STAMP=%VENV%\.lora-gui-installed-%MODE%"
if not exist "%STAMP%" (
    echo [lora-gui] Installing LoRA GUI and its libraries ^(first run only^)
    "%PY%" -m pip install --upgrade pip
    "%PY%" -c "import torch" >nul 2>nul || (
        where nvidia-smi >nul 2>nul && (
            echo [lora-gui] NVIDIA GPU found: installing PyTorch with CUDA
            "%PY%" -m pip install torch==%TORCH_VERSION% --index-url https://download.pytorch.org/whl/cu128 --extra-index-url https://pypi.org/simple
        ) || (
            "%PY%" -m pip install torch==%TORCH_VERSION%
        )
    )
    if "%MODE%"=="test" ("%PY%" -m pip install -e ".[test]") else ("%PY%" -m pip install -e .)
    if errorlevel 1 (
        echo [lora-gui] Installation failed; see the messages above.
        pause
        exit /b 1
    )
    echo done> "%STAMP%"
)

if "%MODE%"=="test" (
    shift
    "%PY%" -m pytest %2 %3 %4 %5 %6 %7 %8 %9
    exit /b !errorlevel!
)
"%PY%" app.py %*
