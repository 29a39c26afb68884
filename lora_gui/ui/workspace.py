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


class NotAFolder(ValueError):
    """An extra dataset folder given at launch that is not a folder."""


@dataclass(frozen=True)
class Workspace:
    root: Path
    # Dataset folders outside the workspace (``lora-gui --datasets DIR``): listed, shown and trained on, never
    # written to (captions, uploads and caches go elsewhere or are refused).
    extra_datasets: tuple[Path, ...] = ()

    @classmethod
    def create(cls, root: str | Path, extra_datasets: tuple[str | Path, ...] = ()) -> Workspace:
        extras = []
        for given in extra_datasets:
            folder = Path(given).expanduser().resolve()
            if not folder.is_dir():
                raise NotAFolder(f"--datasets {given}: {folder} is not a folder. Give a folder that holds a dataset "
                                 "(or folders of datasets), for example --datasets ~/pictures/datasets.")
            extras.append(folder)
        workspace = cls(Path(root).expanduser().resolve(), tuple(dict.fromkeys(extras)))
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
        """Folders whose files the browser may fetch: datasets, outputs and the extra dataset folders."""
        return [str(self.datasets), str(self.outputs), *map(str, self.extra_datasets)]

    def resolve(self, text: str | Path, under: Path | None = None) -> Path:
        """A user-given path, relative to ``under`` (default the workspace), refused if it leaves the workspace.

        Links are resolved first, so a link inside the workspace that points outside is refused too."""
        path = self._absolute(text, under)
        if not self.contains(path):
            raise OutsideWorkspace(
                f"{clip(text)} is outside the workspace {self.root} (links are followed: a link that points "
                "outside counts as outside). Put the folder inside the workspace (for example under datasets/)"
                f"{self._outside_advice()}."
            )
        return path

    def resolve_dataset(self, text: str | Path, under: Path | None = None) -> Path:
        """Like ``resolve``, and also a folder in one of the extra dataset folders (which the app only reads)."""
        path = self._absolute(text, under)
        if self.contains(path) or self.extra_root(path) is not None:
            return path
        return self.resolve(text, under)  # refused, with the message

    def extra_root(self, path: Path) -> Path | None:
        """The extra dataset folder ``path`` (links resolved) is in, or None."""
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError):
            return None
        return next((folder for folder in self.extra_datasets if resolved.is_relative_to(folder)), None)

    def read_only(self, path: Path) -> bool:
        """Whether ``path`` is in an extra dataset folder (outside the workspace), which the app never writes."""
        return not self.contains(path) and self.extra_root(path) is not None

    def dataset_root(self, path: Path) -> Path:
        """The folder a scan of the dataset ``path`` is confined to: its extra dataset folder, else the workspace."""
        return self.extra_root(path) if self.read_only(path) else self.root

    def _outside_advice(self) -> str:
        if self.extra_datasets:
            listed = ", ".join(str(folder) for folder in self.extra_datasets)
            return f"; datasets may also be in the extra dataset folders given at launch: {listed}"
        return (", start the app with --workspace pointing at its parent, or add the folder with "
                "--datasets DIR (read-only)")

    def _absolute(self, text: str | Path, under: Path | None) -> Path:
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
        """The workspace's datasets, then each extra dataset folder (if it holds images itself) and its folders."""
        from lora_gui.data.scan import IMAGE_EXTENSIONS

        listed = self._folders(self.datasets)
        for extra in self.extra_datasets:
            try:
                has_images = any(entry.suffix.lower() in IMAGE_EXTENSIONS for entry in extra.iterdir())
                listed += ([str(extra)] if has_images else []) + sorted(
                    str(entry.resolve()) for entry in extra.iterdir()
                    if not entry.name.startswith(".") and entry.is_dir() and self.extra_root(entry) is not None)
            except OSError:  # gone or unreadable since launch: nothing to list
                continue
        return list(dict.fromkeys(listed))

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
