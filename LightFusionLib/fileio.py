"""File output that never leaves a damaged or half-written file, and output paths checked before
any work starts.

Every output goes to a hidden temporary beside the target, is verified, then renamed over the
target. The temporary's name says who made it (``.lightfusion-tmp-<host>-<pid>-<random>-<name>``),
so a run that was killed before it could clean up leaves a file the next write to that folder
recognises and removes.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import LightFusionError

TEMP_PREFIX = ".lightfusion-tmp-"
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_TEMP_NAME = re.compile(rf"^{re.escape(TEMP_PREFIX)}(?P<host>[0-9a-f]{{6}})-(?P<pid>\d+)-[0-9a-f]{{8}}-")
_LEGACY_TEMP = re.compile(r"^\.(tmp|lightfusion-probe)-[0-9a-f]{8}-")  # names used by versions before 0.2
STALE_AFTER_S = 3600.0  # a temporary of another host (or an old version) older than this is abandoned


class OutputError(LightFusionError):
    """An output that cannot be written (folder missing, not writable, disk full, ...)."""


def temp_path_for(target: Path) -> Path:
    """A hidden temporary beside ``target`` that keeps its full name as suffix (writers that pick a
    format by extension, like SimpleITK, still do)."""
    return target.with_name(f"{TEMP_PREFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{target.name}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete temporaries left in ``folder`` by killed runs: ours from a process of this host that
    no longer runs, or any of ours older than an hour. Returns what was removed. Temporary folders
    (:func:`atomic_output_folder`, e.g. a DICOM series being written) are removed with their files."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None and not _LEGACY_TEMP.match(entry.name):
            continue
        try:
            is_folder = match is not None and entry.is_dir(follow_symlinks=False)
            if not (entry.is_file(follow_symlinks=False) or is_folder):
                continue
            dead = match is not None and match["host"] == _HOST and not _pid_alive(int(match["pid"]))
            if dead or now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S:
                if is_folder:
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


_OS_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "the file system is read-only", errno.EFBIG: "the file is too large for the file system"}


def os_error_reason(exc: OSError) -> str:
    """'the disk is full', 'permission denied', ...: the cause in words the user can act on."""
    return _OS_REASONS.get(exc.errno, exc.strerror or type(exc).__name__)


def describe_os_error(exc: OSError, path: Path | str) -> str:
    """'cannot write x: the disk is full' and the like."""
    return f"cannot write {path}: {os_error_reason(exc)}"


@contextlib.contextmanager
def atomic_output(path: str | Path, verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success run ``verify(tmp)`` (it raises if the file
    is not what was meant to be written), then rename it onto ``path``; delete it on any error.
    Readers never see a half-written file, and a failed write never replaces a good one."""
    target = Path(path)
    remove_stale_temp_files(target.parent)
    tmp = temp_path_for(target)
    try:
        yield tmp
        if verify is not None:
            verify(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        raise OutputError(describe_os_error(exc, target)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_output_folder(path: str | Path, verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path``; on success run ``verify(tmp)`` (it raises if the
    folder does not hold what was meant to be written), then rename it to ``path`` (which must not
    exist, or be an empty folder); delete it and its files on any error. Readers never see a
    half-written series, and a failed write leaves nothing behind."""
    target = Path(path)
    remove_stale_temp_files(target.parent)
    tmp = temp_path_for(target)
    try:
        tmp.mkdir()
        yield tmp
        if verify is not None:
            verify(tmp)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # an empty folder made for the output; os.rename would refuse a non-empty one
        os.rename(tmp, target)
    except OSError as exc:
        raise OutputError(describe_os_error(exc, target)) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_new_output_folder(path: str | Path, what: str = "output folder", inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse, before any work, an output folder that exists and is not empty (nothing is ever
    written into or over an existing folder's files), is a file, is or lies inside an input, or
    whose parent folder is missing or not writable."""
    out = Path(path)
    for p in inputs:
        if same_path(out, p) or (p.is_dir() and same_path(out.parent, p)):
            raise OutputError(f"{what} {out} is or lies in the input {p}; choose a new folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{what} {out} is a file; give the name of a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise OutputError(f"{what} {out} exists and is not empty; give a new folder")
    check_output_folder(out.parent, f"{what}'s parent folder", create=False)
    return out


def check_output_file(path: str | Path, what: str = "output", inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse, before any work, an output file that is an input, is a folder, or whose folder is
    missing or not writable (checked by creating and deleting a temporary there: os.access says yes
    to root even where writing fails)."""
    out = Path(path)
    for p in inputs:
        if same_path(out, p):
            raise OutputError(f"{what} {out} is an input; choose another path")
        if p.is_dir() and same_path(out.parent, p):
            raise OutputError(f"{what} {out} would be written into the input DICOM folder {p}")
    if out.is_dir():
        raise OutputError(f"{what} {out} is a folder; give a file name")
    check_output_folder(out.parent, f"{what} folder", create=False)
    return out


def check_output_folder(folder: str | Path, what: str = "output folder", create: bool = True) -> Path:
    """Refuse, before any work, a folder that cannot be created or written to."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{what} {folder} is a file, not a folder")
    if not folder.is_dir():
        if not create:
            raise OutputError(f"{what} {folder} does not exist")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {what} {folder}: {os_error_reason(exc)}") from None
    probe = temp_path_for(folder / "probe")
    try:
        probe.open("xb").close()
    except OSError as exc:
        raise OutputError(f"{what} {folder} is not writable ({os_error_reason(exc)})") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return folder


def same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


class NativeStderr:
    """What native code (ITK, GDCM, the NIfTI library) printed to file descriptor 2 while captured."""

    text: str = ""

    def lines(self) -> list[str]:
        return [ln.strip() for ln in self.text.splitlines() if ln.strip()]


@contextlib.contextmanager
def captured_native_stderr() -> Iterator[NativeStderr]:
    """Capture file descriptor 2 (C/C++ libraries write there, bypassing sys.stderr) into
    ``.text``, so their warnings never reach the user's terminal; our one-line message may quote
    them. Process-wide while active: keep it around library calls only."""
    import SimpleITK as sitk

    result = NativeStderr()
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    with contextlib.suppress(AttributeError, ValueError):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (some embedded interpreters): nothing to capture
        try:
            yield result
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield result
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
            sink.seek(0)
            result.text = sink.read().decode(errors="replace")
