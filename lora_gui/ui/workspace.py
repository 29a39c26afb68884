"""The workspace: where datasets, outputs and caches live, and the only place the browser may reach."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MAX_SHOWN = 120  # characters of a user-given value repeated in a message
MAX_PATH_CHARS = 4096  # longer text is no path on any system this runs on


class OutsideWorkspace(ValueError):
    pass


class BadPath(OutsideWorkspace):
    """Text that cannot name anything in the workspace (too long, a NUL byte); a subclass of
    ``OutsideWorkspace`` so that every handler that refuses outside paths refuses these the same way."""


def clip(value: object, limit: int = MAX_SHOWN) -> str:
    """A user-given value as a message may repeat it: at most ``limit`` characters, one line."""
    text = " ".join(str(value).split("\n"))
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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

    @property
    def state(self) -> Path:
        """What the app keeps between page loads and restarts (the Config tab's draft, the run queue)."""
        return self.root / ".lora-gui"

    def allowed_paths(self) -> list[str]:
        """Folders whose files the browser may fetch: datasets and outputs, nothing else."""
        return [str(self.datasets), str(self.outputs)]

    def resolve(self, text: str | Path, under: Path | None = None) -> Path:
        """A user-given path, relative to ``under`` (default the workspace), refused if it leaves the workspace.

        Links are resolved first, so a link inside the workspace that points outside is refused too."""
        raw_text = str(text)
        if "\x00" in raw_text or len(raw_text) > MAX_PATH_CHARS:
            raise BadPath(f"{clip(raw_text)} is not a usable path (too long, or it contains a NUL character). "
                          "Pick a folder from the list, or type a short path such as datasets/my-set.")
        base = under or self.root
        try:
            raw = Path(raw_text.strip()).expanduser()
            path = (raw if raw.is_absolute() else base / raw).resolve()
        except (OSError, RuntimeError) as exc:  # e.g. ~unknown-user, a link loop
            raise BadPath(f"{clip(raw_text)} can't be used as a path ({exc.__class__.__name__}). Pick a folder "
                          "from the list, or type a path such as datasets/my-set.") from None
        if not self.contains(path):
            raise OutsideWorkspace(
                f"{clip(raw_text)} is outside the workspace {self.root} (links are followed: a link that points "
                "outside counts as outside). Put the folder inside the workspace (for example under datasets/) or "
                "start the app with --workspace pointing at its parent."
            )
        return path

    def contains(self, path: str | Path) -> bool:
        """Whether ``path``, with every link resolved, is inside the workspace."""
        try:
            return Path(path).resolve().is_relative_to(self.root)
        except (OSError, RuntimeError):
            return False

    def relative(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.root))
        except ValueError:
            return str(path)

    def list_datasets(self) -> list[str]:
        return self._folders(self.datasets)

    def list_runs(self) -> list[str]:
        return self._folders(self.outputs)

    def _folders(self, parent: Path) -> list[str]:
        """The folders in ``parent``; hidden ones and links that lead outside the workspace are left out."""
        return sorted(self.relative(p) for p in parent.iterdir()
                      if not p.name.startswith(".") and p.is_dir() and self.contains(p))


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_folder_name(name: str, fallback: str = "untitled") -> str:
    """A name usable as one folder: no separators, no leading dots."""
    cleaned = _SAFE_NAME.sub("-", name.strip()).strip(".-")
    return cleaned[:80] or fallback
