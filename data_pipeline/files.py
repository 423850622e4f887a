"""Writing a file so that a reader, a crash or a second writer never sees half of it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace path's contents with data (text is written as UTF-8): a reader (or a crash) sees the
    old file or the new one, never half of one, even with several processes writing it at once
    (each through its own temporary file, fsynced before the rename).

    Args:
        path: the file.
        data: its new contents.
    """
    write_files_atomically({path: data})


def write_files_atomically(files: Mapping[str | os.PathLike, str | bytes]) -> None:
    """Replace several files, each one whole: all are written to temporary names first (fsynced)
    and renamed only then, so a failure while writing (a full disk) leaves every old file as it
    was; only a crash between the renames leaves some files new and the others old.

    Args:
        files: path → new contents (text is written as UTF-8); the temporary files sit beside them.
    Raises:
        OSError: a file could not be written; no file was replaced and no temporary file is left.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            staged.append((tmp, path))
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)
