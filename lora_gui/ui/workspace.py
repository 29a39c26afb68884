"""The workspace: where datasets, outputs and caches live, and the only place the browser may reach."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


class OutsideWorkspace(ValueError):
    pass


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def create(cls, root: str | Path) -> Workspace:
        workspace = cls(Path(root).expanduser().resolve())
        for folder in (workspace.datasets, workspace.outputs, workspace.cache, workspace.configs):
            folder.mkdir(parents=True, exist_ok=True)
        return workspace

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    def allowed_paths(self) -> list[str]:
        """Folders whose files the browser may fetch: datasets and outputs, nothing else."""
        return [str(self.datasets), str(self.outputs)]

    def resolve(self, text: str | Path, under: Path | None = None) -> Path:
        """A user-given path, relative to ``under`` (default the workspace), refused if it leaves the workspace."""
        base = under or self.root
        raw = Path(str(text).strip()).expanduser()
        path = (raw if raw.is_absolute() else base / raw).resolve()
        if not path.is_relative_to(self.root):
            raise OutsideWorkspace(
                f"{text} is outside the workspace {self.root}. Put the folder inside the workspace "
                "(for example under datasets/) or start the app with --workspace pointing at its parent."
            )
        return path

    def relative(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.root))
        except ValueError:
            return str(path)

    def list_datasets(self) -> list[str]:
        return sorted(self.relative(p) for p in self.datasets.iterdir() if p.is_dir() and not p.name.startswith("."))

    def list_runs(self) -> list[str]:
        return sorted(self.relative(p) for p in self.outputs.iterdir() if p.is_dir() and not p.name.startswith("."))


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_folder_name(name: str, fallback: str = "untitled") -> str:
    """A name usable as one folder: no separators, no leading dots."""
    cleaned = _SAFE_NAME.sub("-", name.strip()).strip(".-")
    return cleaned[:80] or fallback
