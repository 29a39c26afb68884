"""Where caption files go, and writing them so an interrupted write leaves the old file or the new one."""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from pathlib import Path

from lora_gui.data.scan import ImageFile


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` as UTF-8 to a hidden temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temp, "xb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(OSError):
            os.chmod(temp, stat.S_IMODE(path.stat().st_mode))  # keep the old file's permissions
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _sync_folder(path.parent)


def caption_target(file: ImageFile, root: Path, extension: str) -> Path:
    """The image's caption file: the existing one, else beside the image, or in the parallel ``captions/``
    folder when the dataset uses the ``images/`` + ``captions/`` layout."""
    if file.caption_path is not None:
        return file.caption_path
    parts = file.path.relative_to(root).parts
    folders = [part.lower() for part in parts[:-1]]
    if "images" in folders:
        i = len(folders) - 1 - folders[::-1].index("images")
        captions = root.joinpath(*parts[:i], "captions")
        if captions.is_dir():
            return captions.joinpath(*parts[i + 1 : -1], file.path.stem + extension)
    return file.path.with_name(file.path.stem + extension)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX only; Windows has no folder handles)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
