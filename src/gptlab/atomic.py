"""Writes that a crash, a kill or a full disk never leave half done.

The new content goes to a temporary file beside the target (the same filesystem, so the
rename cannot turn into a copy), is flushed to disk, and only then replaces the target; the
directory is synced so the rename itself survives a power cut. On failure the temporary file
is removed and the old target is untouched. A kill leaves at most a `.<name>.<pid>.tmp`,
which `remove_stale_temporaries` clears when the directory's next owner starts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TEMPORARY_SUFFIX = ".tmp"


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")


def sync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content into; it replaces `path` on success."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    put_in_place(tmp, path)


def put_in_place(tmp: Path, path: Path) -> None:
    """Rename the complete `tmp` over `path` and make the rename durable; `tmp` is removed if
    the rename fails."""
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through `write(file)`, all or nothing."""
    with replacing(path) as f:
        write(f)


def link_replacing(source: Path, path: Path) -> bool:
    """Make `path` a second name of the file `source` (a hard link: no byte is written),
    replacing `path` atomically; False, with nothing changed, where the filesystem has no hard
    links (or `source` is gone), so the caller writes instead."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        os.link(source, tmp)
    except OSError:
        return False
    put_in_place(tmp, path)
    return True


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in `directory` (the caller owns it)."""
    stale = (
        [p for p in Path(directory).glob(f".*{TEMPORARY_SUFFIX}") if p.is_file()]
        if Path(directory).is_dir()
        else []
    )
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
