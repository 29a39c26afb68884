"""Where a config comes from besides the form: VRAM presets, saved config files, the CLI command.

Gradio-free: the Config tab calls these, tests call them directly.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from lora_gui.config import (
    ConfigError,
    TrainingConfig,
    build_config,
    list_presets,
    preset_description,
    read_config_file,
    save_config,
    unavailable_presets,
    validate_config,
)
from lora_gui.ui.forms import config_to_values
from lora_gui.ui.workspace import Workspace, safe_folder_name

# (label, preset suffix, GB): presets are named "<family>-<suffix>".
TIERS: tuple[tuple[str, str, int], ...] = (
    ("CPU demo", "cpu-demo", 0), ("8 GB", "8gb", 8), ("12 GB", "12gb", 12), ("16 GB", "16gb", 16),
    ("24 GB", "24gb", 24), ("48+ GB", "48gb", 48),
)
TIER_LABELS = tuple(label for label, _, _ in TIERS)
# Cards report a little less than their marketed size (a "24 GB" RTX 4090 shows 23.6 GiB, a "16 GB" T4 14.8).
TIER_TOLERANCE = 1.10
# What applying a preset never changes: the user's data, names, prompts and folders.
KEEP_KEYS = ("dataset.dir", "dataset.trigger_word", "dataset.cache_dir", "model.cache_dir", "output.dir",
             "output.name", "sample.prompts")
CONFIG_SUFFIXES = (".toml", ".yaml", ".yml", ".json")
MAX_CONFIG_BYTES = 1_000_000


# ----------------------------------------------------------------------------- presets


def detect_tier(gpu_total_gib: float | None) -> str:
    """The largest tier that fits the GPU's memory; "CPU demo" without a GPU."""
    if not gpu_total_gib:
        return TIER_LABELS[0]
    fitting = [label for label, _, gb in TIERS[1:] if gb <= gpu_total_gib * TIER_TOLERANCE]
    return fitting[-1] if fitting else TIER_LABELS[0]


def preset_name(family: Any, tier_label: Any) -> str:
    suffixes = {label: suffix for label, suffix, _ in TIERS}
    if not isinstance(tier_label, str) or tier_label not in suffixes:
        raise ConfigError(f"Unknown VRAM tier {tier_label!r}; choose one of: {', '.join(TIER_LABELS)}.")
    name = f"{family}-{suffixes[tier_label]}" if isinstance(family, str) else ""
    presets = list_presets()
    if name in presets:
        return name
    reason = unavailable_presets().get(name)
    if reason:
        raise ConfigError(f"{reason} (The memory planner's figures: `lora-gui plan`.)")
    from lora_gui.engine.families.registry import family_names

    if family not in family_names():
        raise ConfigError(f"model.family: presets exist for {', '.join(family_names())}; pick one of those "
                          "families to apply a preset.")
    own = [preset for preset in presets if preset.startswith(f"{family}-") and preset.removeprefix(f"{family}-")
           in suffixes.values()]
    raise ConfigError(f"There is no {tier_label} preset for {family} yet (it has: {', '.join(own) or 'none'}). "
                      "Pick one of those tiers, or set the form by hand.")


def preset_summary(name: str) -> str:
    info = preset_description(name)
    return f"**{name}**: {info.get('summary', '')}"


def apply_preset(values: dict[str, Any], name: str) -> dict[str, Any]:
    """Form values for defaults + the preset, keeping the user's own fields (KEEP_KEYS) from ``values``."""
    applied = config_to_values(build_config(preset=name).model_dump(mode="json"))
    for key in KEEP_KEYS:
        if key in values:
            applied[key] = values[key]
    return applied


def preset_changes(values: dict[str, Any], name: str) -> list[list[str]]:
    """[setting, current, preset value] for every form value the preset would change."""
    applied = apply_preset(values, name)
    return [[key, _show(values.get(key)), _show(value)] for key, value in applied.items()
            if not _same(values.get(key), value)]


def _same(a: Any, b: Any) -> bool:
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))
    return float(a) == float(b) if numbers else _show(a) == _show(b)


def _show(value: Any) -> str:
    if isinstance(value, str):
        return " | ".join(line for line in value.splitlines() if line.strip()) if "\n" in value else value
    return "" if value is None else str(value)


# ----------------------------------------------------------------------------- CLI command


def cli_command(config: TrainingConfig, saved_path: Path | None = None) -> str:
    """The command that trains the same config: from the saved file, else a preset plus --set options."""
    if saved_path is not None:
        return f"lora-gui train {shlex.quote(str(saved_path))}"
    current = _flatten(config.model_dump(mode="json"))
    candidates = [p for p in list_presets() if p.startswith(f"{config.model.family}-")]
    best_preset, best_diff = None, _differences(current, _flatten(TrainingConfig().model_dump(mode="json")))
    for preset in candidates:
        diff = _differences(current, _flatten(build_config(preset=preset).model_dump(mode="json")))
        if len(diff) < len(best_diff):
            best_preset, best_diff = preset, diff
    parts = ["lora-gui train"] + ([f"--preset {best_preset}"] if best_preset else [])
    parts += [f"--set {shlex.quote(f'{key}={json.dumps(value)}')}" for key, value in best_diff.items()]
    return " \\\n  ".join(parts)


def _flatten(data: dict) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in data.items() for key, value in values.items()}


def _differences(current: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in current.items() if base.get(key) != value}


# ----------------------------------------------------------------------------- config files


def config_file_path(workspace: Workspace, name: Any) -> Path:
    """<workspace>/configs/<safe name>.toml for a name typed by the user; refuses paths."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("Type a name for the config, for example my-lora.")
    text = name.strip()
    if any(sep in text for sep in ("/", "\\", "..")) or text.startswith(("~", ".")):
        raise ConfigError(f"{text!r} is not a plain name: leave out / \\ .. ~ and leading dots. "
                          "Configs are always saved in the workspace's configs/ folder.")
    stem = text[:-5] if text.lower().endswith(".toml") else text
    return workspace.configs / f"{safe_folder_name(stem, fallback='config')}.toml"


def save_named_config(config: TrainingConfig, workspace: Workspace, name: Any, overwrite: bool) -> Path:
    path = config_file_path(workspace, name)
    if path.exists() and overwrite is not True:
        raise ConfigError(f"configs/{path.name} already exists. Tick 'Overwrite' to replace it, "
                          "or choose another name.")
    return save_config(config, path)


def list_saved_configs(workspace: Workspace) -> list[str]:
    folder = workspace.configs
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CONFIG_SUFFIXES)


def saved_config_path(workspace: Workspace, name: Any) -> Path:
    """The file behind a name from the saved-configs list; anything else is refused."""
    if name not in list_saved_configs(workspace):
        raise ConfigError(f"No saved config named {name!r} in configs/; pick one from the list.")
    return workspace.configs / name


def load_config(path: str | Path) -> TrainingConfig:
    """A config file (the CLI's TOML, or YAML/JSON) layered over the defaults."""
    path = Path(path)
    if path.suffix.lower() not in CONFIG_SUFFIXES:
        raise ConfigError(f"{path.name}: not a config file; use .toml, .yaml or .json.")
    if not path.is_file():
        raise ConfigError(f"{path.name} does not exist any more; upload or pick it again.")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path.name} is larger than {MAX_CONFIG_BYTES // 1000} kB; it is not a config file.")
    data = read_config_file(path)
    data.pop("preset", None)  # a preset file's descriptive table
    return validate_config(data)


def same_config_file(path: Path | None, config: TrainingConfig) -> bool:
    """Whether ``path`` still holds exactly ``config`` (so the CLI command can name the file)."""
    if path is None:
        return False
    try:
        return load_config(path) == config
    except (ConfigError, OSError):
        return False


# ----------------------------------------------------------------------------- panel texts (Markdown)


def changes_table(rows: list[list[str]], name: str, applied: bool = False) -> str:
    if not rows:
        return f"Applied **{name}**: nothing changed." if applied else f"The form matches preset **{name}**."
    title = f"**Applied {name}**, changed:" if applied else f"**Apply preset {name}** would change:"
    head = "| Setting | Before | After |" if applied else "| Setting | Current | Preset |"
    lines = [title, "", head, "|---|---|---|"]
    lines += ["| " + " | ".join(_cell(text) for text in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(text: str, limit: int = 60) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return (text or "(empty)").replace("|", "\\|").replace("`", "'")


def plan_hint(gpu) -> str:
    """What the plan panel says before a plan, or instead of one on a machine without a GPU."""
    if gpu is None:
        return ("**Memory and time:** no GPU detected, so no VRAM figures here: training runs on the CPU, and the "
                "Train tab shows its measured speed after the first steps. To plan a GPU run from this machine: "
                "`lora-gui plan --vram 24 CONFIG`.")
    return (f"**Memory and time:** *Plan memory and time* traces this config's training step at full size and "
            f"checks it against your {gpu.label}.")


def plan_text(plan, gpu, matmul_tflops: float | None = None, advice: str | None = None) -> str:
    """The traced memory plan (``engine.planner.MemoryPlan``) against the detected GPU, with the least step time
    at its measured matrix speed and, when it is tight or over, ``advice`` (``planner.advice.fitting_advice``);
    without a GPU, the hint alone (no VRAM figures on a CPU-only machine)."""
    if gpu is None or not gpu.total_gib:
        return plan_hint(None)
    fits = plan.total_bytes <= gpu.total_gib * 1024**3
    verdict = f"{'✓' if fits else '✗'} **{plan.verdict(gpu.total_gib)}** ({gpu.name})"
    lines = ["### Memory and time plan (traced)", verdict, ""]
    if advice:
        lines += [f"**{'To fit' if not fits else 'To fit with room to spare'}:** {advice}", ""]
    lines += [f"- {line}" for line in [*plan.lines(), plan.caption_line(gpu.total_gib)] if line]
    return "\n".join([*lines, f"- {plan.time_line(matmul_tflops)}"])


def problems_text(message: str) -> str:
    """A ConfigError message as a Markdown list, each problem starting with its key."""
    items = []
    for line in (line.strip() for line in message.splitlines()):
        if not line or line == "The configuration has problems:":
            continue
        key, sep, rest = line.removeprefix("- ").partition(": ")
        items.append(f"- `{key}`: {rest}" if sep and " " not in key else f"- {line.removeprefix('- ')}")
    return "**Validation:** ✗ fix these before training:\n" + "\n".join(items)


def effective_batch_text(config: TrainingConfig, gpus: int = 1) -> str:
    """The samples one optimizer step sees: per-GPU batch x GPUs x accumulation."""
    batch, accumulation = config.train.batch_size, config.train.gradient_accumulation
    text = (f"**Effective batch:** {batch} per GPU × {accumulation} accumulation = {batch * accumulation} samples "
            "per step")
    if gpus > 1:
        text += (f"; on {gpus} GPUs (Train tab → GPUs): {batch} × {gpus} × {accumulation} = "
                 f"{batch * gpus * accumulation}")
    return text + "."


def valid_text(config: TrainingConfig, gpus: int = 1) -> str:
    warnings = []
    if not config.dataset.dir:
        warnings.append("`dataset.dir` is empty: pick a folder in the Dataset tab before training.")
    elif not Path(config.dataset.dir).is_dir():
        warnings.append(f"`dataset.dir`: {config.dataset.dir} does not exist yet.")
    if not any(prompt.strip() for prompt in config.sample.prompts):
        warnings.append("`sample.prompts` is empty: no validation images will be rendered (add one prompt per "
                        "line to see the LoRA's progress).")
    return ("**Validation:** ✓ Config is valid. " + effective_batch_text(config, gpus)
            + "".join(f"\n- ⚠ {w}" for w in warnings))
