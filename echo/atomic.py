# Copyright 2025 The ECHO-IHG Authors. Licensed under the Apache License, Version 2.0.
"""The one atomic write of the project: a temporary file beside the target, then `os.replace`.

A killed or failed writer (SIGKILL, a full disk) leaves the old file, or none, never a truncated one; the temporary
file of a failed write is removed. Every file the project writes for later reading (settings, clip-folder JSON and
tensors, records, state files, model cards) goes through `atomic_write`.

```python
with atomic_write(path) as tmp:  # a Path beside ``path``
    save_file(tensors, str(tmp))
write_text_atomic(path, text)
```
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_path(path: str | os.PathLike, keep_suffix: bool = False) -> Path:
    """The temporary name of ``path`` while it is written: hidden, beside it (the same file system, so the rename is
    atomic), and unique to the process; ``keep_suffix`` ends it with ``path``'s suffix (for writers that choose the
    format by it, e.g. ``.mp4``)."""
    path = Path(path)
    if keep_suffix:
        return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_write(path: str | os.PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    r"""
    Yields a temporary path beside ``path`` for the caller to write; on success it replaces ``path`` (`os.replace`),
    on an error it is removed and the error propagates.

    Args:
        path (`str` or `os.PathLike`): the file to write; its folder must exist.
        keep_suffix (`bool`, defaults to `False`): the temporary name ends with ``path``'s suffix.
    """
    path = Path(path)
    tmp = temporary_path(path, keep_suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to ``path`` atomically (`atomic_write`); returns the path."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)
