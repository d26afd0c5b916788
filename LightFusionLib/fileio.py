"""Atomic file output: write to a hidden temporary beside the target, then rename over it."""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder that keeps its full name as suffix (so writers
    that pick a format by extension, like SimpleITK, still do); rename it onto ``path`` on success,
    delete it on any error. Readers never see a half-written file."""
    target = Path(path)
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{target.name}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
