"""The Config tab's form as the user left it, kept in the workspace on every edit and shown again when the
page loads (a reload, another browser tab, a restart of the app). It is a draft: it may be invalid, and
only values of the form's own keys and plain types come back from the file."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from lora_gui.ui.workspace import Workspace

log = logging.getLogger("lora_gui.ui")
DRAFT_FILE = "config-draft.json"
MAX_DRAFT_BYTES = 1_000_000


def draft_path(workspace: Workspace) -> Path:
    return workspace.state / DRAFT_FILE


def save_draft(workspace: Workspace, form: dict[str, Any], tier: Any) -> None:
    """Write the form (atomically: a crash leaves the previous draft); a disk problem is logged, not raised."""
    data = {"form": {key: value for key, value in form.items() if _plain(value)},
            "tier": tier if isinstance(tier, str) else None}
    path = draft_path(workspace)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(data, indent=1), encoding="utf-8")
        temporary.replace(path)
    except OSError as exc:
        log.warning("Could not keep the Config tab's draft in %s: %s", path, exc)


def load_draft(workspace: Workspace, keys: set[str]) -> tuple[dict[str, Any], str | None] | None:
    """(form values of ``keys``, tier) from the saved draft; None when there is none or it is unreadable."""
    path = draft_path(workspace)
    try:
        if path.stat().st_size > MAX_DRAFT_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("form"), dict):
        return None
    form = {key: value for key, value in data["form"].items() if key in keys and _plain(value)}
    tier = data.get("tier") if isinstance(data.get("tier"), str) else None
    return (form, tier) if form else None


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, str | bool | int | float):
        return True
    return isinstance(value, list) and all(isinstance(item, str) for item in value)
