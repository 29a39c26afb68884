"""CLI behaviour that needs no model: help, usage errors, config writing, import hygiene."""

import subprocess
import sys

from lora_gui.cli import main


def run_module(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_gui", *args], capture_output=True, text=True, timeout=timeout)


def test_help_is_fast_and_does_not_import_heavy_libraries():
    code = (
        "import sys, lora_gui.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'gradio') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "train" in out.stdout and "sample" in out.stdout
    assert "HEAVY []" in out.stdout


def test_python_dash_m_matches_console_script_help():
    result = run_module("train", "--help")
    assert result.returncode == 0
    assert "--resume" in result.stdout and "--preset" in result.stdout and "--set" in result.stdout


def test_engine_does_not_import_gradio():
    code = (
        "import sys\n"
        "import lora_gui.engine.train, lora_gui.engine.runner, lora_gui.engine.compare, lora_gui.cli\n"
        "print('GRADIO', 'gradio' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "GRADIO False" in out.stdout, out.stderr


def test_bad_override_is_a_usage_error(capsys, tmp_path):
    code = main(["train", "--preset", "sd15-cpu-demo", "--set", "lora.rank=0", "--set", f"output.dir={tmp_path}"])
    assert code == 2
    assert "lora.rank" in capsys.readouterr().err


def test_train_without_config_explains(capsys):
    assert main(["train"]) == 2
    assert "init-config" in capsys.readouterr().err


def test_init_config_writes_loadable_file(tmp_path, capsys):
    path = tmp_path / "mine.toml"
    assert main(["init-config", str(path), "--preset", "flux-cpu-demo", "--set", "lora.rank=4"]) == 0
    from lora_gui.config import build_config

    config = build_config(file=path)
    assert config.model.family == "flux" and config.lora.rank == 4
    assert main(["init-config", str(path)]) == 2  # never overwrites


def test_presets_command_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "sdxl-24gb" in out and "flux-cpu-demo" in out


def test_resume_latest_without_checkpoint_is_a_usage_error(tmp_path, capsys):
    code = main(["train", "--preset", "sd15-cpu-demo", "--set", f"output.dir={tmp_path}",
                 "--set", f"dataset.dir={tmp_path}", "--resume", "latest"])
    assert code == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_expected_library_messages_are_dropped_and_others_kept():
    import logging
    import warnings

    from lora_gui.quiet import quiet_expected_noise

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers.loaders.lora_base")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_expected_noise()
            warnings.warn("Already found a `peft_config` attribute in the model. This will lead to having multiple "
                          "adapters in the model. Make sure to know what you are doing!", stacklevel=1)
            warnings.warn("something else", stacklevel=1)
            logger.warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'.")
            logger.warning("A real problem")
    finally:
        logger.removeHandler(handler)
    assert [str(warning.message) for warning in caught] == ["something else"]
    assert [record.getMessage() for record in records] == ["A real problem"]
