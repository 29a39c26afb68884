@echo off
rem Install on first run (the tested versions in requirements.lock), then start LoRA GUI.
rem   launch.bat [--port N] [--listen] [--share] [--auth user:pass] [--workspace DIR]
rem   launch.bat test [pytest arguments]     installs the test lock and runs the test suite
rem   launch.bat --version                   what is installed (app, torch/CUDA, libraries)
setlocal EnableDelayedExpansion
cd /d "%~dp0"
if "%LORA_GUI_VENV%"=="" (set "VENV=.venv") else (set "VENV=%LORA_GUI_VENV%")
if "%LORA_GUI_TORCH_VERSION%"=="" (set "TORCH_VERSION=2.13.0") else (set "TORCH_VERSION=%LORA_GUI_TORCH_VERSION%")
rem PyPI's Windows wheels of torch are CPU-only: GPUs take the CUDA 13.0 build from PyTorch's own index.
if "%LORA_GUI_CUDA_INDEX%"=="" (set "CUDA_INDEX=https://download.pytorch.org/whl/cu130") else (set "CUDA_INDEX=%LORA_GUI_CUDA_INDEX%")
if "%LORA_GUI_APP_LOCK%"=="" (set "APP_LOCK=requirements.lock") else (set "APP_LOCK=%LORA_GUI_APP_LOCK%")
if "%LORA_GUI_TEST_LOCK%"=="" (set "TEST_LOCK=requirements-test.lock") else (set "TEST_LOCK=%LORA_GUI_TEST_LOCK%")
set "PY=%VENV%\Scripts\python.exe"
rem The app's --version and the tests compare what is installed with these.
for %%F in ("%APP_LOCK%") do set "LORA_GUI_APP_LOCK=%%~fF"
for %%F in ("%TEST_LOCK%") do set "LORA_GUI_TEST_LOCK=%%~fF"

if not exist "%PY%" (
    echo [lora-gui] Creating a virtual environment in %VENV%
    where py >nul 2>nul && (py -3.11 -m venv "%VENV%" 2>nul || py -3 -m venv "%VENV%") || (python -m venv "%VENV%")
)
if not exist "%PY%" goto :no_python
"%PY%" -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)" || goto :no_python

set "MODE=app"
set "LOCK=%APP_LOCK%"
if /i "%~1"=="test" (
    set "MODE=test"
    set "LOCK=%TEST_LOCK%"
)
if not exist "%LOCK%" (
    echo [lora-gui] %LOCK% is missing: this checkout is incomplete. Clone the project again.
    goto :failed
)

rem Reinstall when pyproject.toml or the lock changed since the last install.
for /f %%H in ('type pyproject.toml "%LOCK%" 2^>nul ^| "%PY%" -c "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"') do set "PRINT=%%H"
set "STAMP=%VENV%\.lora-gui-installed-%MODE%"
set "INSTALLED="
if exist "%STAMP%" set /p INSTALLED=<"%STAMP%"
if not "%INSTALLED%"=="%PRINT%" (
    echo [lora-gui] Installing LoRA GUI with the tested library versions from %LOCK% ^(first run, or the lock changed^)
    "%PY%" -c "import torch" >nul 2>nul || call :install_torch || goto :failed
    "%PY%" -m pip install -qq --require-hashes --only-binary :all: -r "%LOCK%" || goto :failed
    "%PY%" -m pip install -qq --no-deps -e . || goto :failed
    "%PY%" -m pip check >nul 2>nul || (
        "%PY%" -m pip check
        echo [lora-gui] The installed libraries do not fit together ^(above^). Delete %VENV% and run this again.
        goto :failed
    )
    > "%STAMP%" echo %PRINT%
)

if "%MODE%"=="test" goto :run_tests
if /i "%~1"=="--version" (
    "%PY%" -m lora_gui --version
    exit /b !errorlevel!
)
"%PY%" app.py %*
exit /b !errorlevel!

:run_tests
set "LORA_GUI_INSTALLED_LOCK=%LORA_GUI_TEST_LOCK%"
set "PYTEST_ARGS="
shift
:collect_args
if "%~1"=="" goto :args_done
set "PYTEST_ARGS=!PYTEST_ARGS! %1"
shift
goto :collect_args
:args_done
"%PY%" -m pytest !PYTEST_ARGS!
exit /b !errorlevel!

:install_torch
where nvidia-smi >nul 2>nul && (
    echo [lora-gui] NVIDIA GPU found: installing PyTorch %TORCH_VERSION% with CUDA ^(a large download, once^)
    "%PY%" -m pip install torch==%TORCH_VERSION% --index-url %CUDA_INDEX%
    exit /b !errorlevel!
)
echo [lora-gui] No NVIDIA GPU found: installing the CPU build of PyTorch %TORCH_VERSION%
"%PY%" -m pip install torch==%TORCH_VERSION%
exit /b !errorlevel!

:no_python
echo [lora-gui] Python 3.11 or newer is needed. Install it from python.org, tick "Add to PATH", and run this again.
pause
exit /b 1

:failed
echo [lora-gui] Installation failed; see the messages above. Check the connection and run this again.
pause
exit /b 1
