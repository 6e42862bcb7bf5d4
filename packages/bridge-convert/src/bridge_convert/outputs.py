"""Safe output directories for every command that writes a checkpoint.

The rules (why: a conversion pointed at the wrong place must never cost a user their files or a checkpoint):

- nothing this run did not create is deleted or overwritten: a non-empty output is refused unless ``overwrite``;
- even with ``overwrite``, an output that contains or is contained in an input is refused, and so is a directory
  that holds a Megatron training checkpoint (a tracker file or ``iter_*`` directories);
- the output is written into a hidden temporary directory next to it (same filesystem) and renamed into place
  only when complete, so a killed run leaves nothing that looks like a finished checkpoint; the next run into
  the same place removes such leftovers and says so;
- a read-only or full disk is one line naming the path (and, where known, the bytes needed).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["OutputError", "check_output_dir", "format_bytes", "staged_output_dir"]

logger = logging.getLogger("bridge.outputs")

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CONVERTED_MARKER = "converted_by"
"""Key of ``bridge.json`` that marks an iteration written by a conversion (not by training)."""
_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"


class OutputError(ValueError):
    """An output path that cannot be used; the message is one line: the path, why, and the fix."""


def format_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'`` (binary units, as ``df -h`` prints them)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _iteration_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("iter_*") if p.is_dir())


def _is_conversion_output(path: Path) -> bool:
    """A checkpoint root written by ``bridge-convert import``: one iteration, marked as a conversion."""
    import json

    iters = _iteration_dirs(path)
    if len(iters) != 1:
        return False
    try:
        meta = json.loads((iters[0] / "bridge.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and CONVERTED_MARKER in meta


def _holds_training_checkpoint(path: Path) -> bool:
    return ((path / TRACKER_FILE).exists() or bool(_iteration_dirs(path))) and not _is_conversion_output(path)


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output_dir(out: str | os.PathLike, *, overwrite: bool = False,
                     inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse an output directory that this command must not write into.

    Args:
        out: the output directory (it need not exist).
        overwrite: allow replacing a non-empty ``out`` (still never an input, a file or a training checkpoint).
        inputs: the paths this command reads; ``out`` may neither contain nor lie inside any of them.

    Raises:
        OutputError: with one line naming the path, the reason and the fix.
    """
    path = Path(out)
    resolved = path.resolve()
    for source in inputs:
        source_resolved = Path(source).resolve()
        if _related(resolved, source_resolved):
            how = ("is" if resolved == source_resolved else
                   "is inside" if source_resolved in resolved.parents else "contains")
            raise OutputError(f"output {path} {how} the input {source}; write to a separate directory "
                              "(--overwrite does not allow this)")
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is a file, not a directory; choose a directory path")
    if not path.exists():
        ancestor = next(p for p in resolved.parents if p.exists())  # where the new directories would be made
        if not ancestor.is_dir():
            raise OutputError(f"output {path} cannot be made: {ancestor} is a file, not a directory; choose "
                              "another path")
        return
    if _holds_training_checkpoint(path):
        raise OutputError(f"output {path} holds a Megatron training checkpoint ({TRACKER_FILE} or iter_* "
                          "directories); a conversion never writes over one, choose another directory")
    entries = sorted(p.name for p in path.iterdir())
    if entries and not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise OutputError(f"output {path} is not empty ({len(entries)} entries: {shown}); pass --overwrite "
                          "(overwrite=True) to replace it, or choose a new directory")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(parent: Path, name: str) -> None:
    """Remove ``.{name}.tmp-*`` / ``.{name}.old-*`` left by a killed run (one whose process is gone)."""
    for tag in (_TMP_TAG, _OLD_TAG):
        for stale in parent.glob(f".{name}{tag}*"):
            owner = stale.name[len(name) + 1 + len(tag):].split("-", 1)[0]
            if owner.isdigit() and int(owner) != os.getpid() and _pid_alive(int(owner)):
                continue  # another conversion into the same place is running right now
            if owner.isdigit() and int(owner) == os.getpid():
                continue  # this process's own (nested or concurrent) staging
            size = sum(f.stat().st_size for f in stale.rglob("*") if f.is_file()) if stale.is_dir() else 0
            logger.warning("removing %s left by an interrupted run (%s)", stale, format_bytes(size))
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _fresh_dir(parent: Path, name: str, tag: str) -> Path:
    """A new directory ``.{name}{tag}{pid}-{random}`` created with the umask's mode (mkdtemp would use 0700)."""
    while True:
        candidate = parent / f".{name}{tag}{os.getpid()}-{secrets.token_hex(3)}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _disk_error(exc: OSError, out: Path, needed_bytes: int | None) -> OutputError | None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(out.parent).free if out.parent.exists() else None
        need = f"; it needs {format_bytes(needed_bytes)}" if needed_bytes else ""
        has = f", {format_bytes(free)} free" if free is not None else ""
        return OutputError(f"no space left on the device of {out}{need}{has}; free space or choose another disk")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write {exc.filename or out}: {os.strerror(exc.errno)}; choose a writable "
                           "output directory")
    return None


@contextmanager
def staged_output_dir(out: str | os.PathLike, *, overwrite: bool = False, inputs: Sequence[str | os.PathLike] = (),
                      needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out`` that becomes ``out`` only if the block succeeds.

    :func:`check_output_dir` runs first. On success the directory is renamed into place (with ``overwrite`` the
    old ``out`` is moved aside and removed only once the new one is in place). On any exception, including
    KeyboardInterrupt, the temporary directory is removed and nothing at ``out`` changes.

    Args:
        out: the output directory.
        overwrite: allow replacing a non-empty ``out``.
        inputs: paths this command reads (see :func:`check_output_dir`).
        needed_bytes: the size of the output, when known: checked against the free space up front and named in
            the error of a full disk.

    Raises:
        OutputError: for a refused output, a read-only parent, too little space, or ENOSPC while writing.
    """
    out = Path(out).absolute()
    check_output_dir(out, overwrite=overwrite, inputs=inputs)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise (_disk_error(exc, out, needed_bytes) or exc) from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write into {parent}: permission denied or read-only; choose a writable output "
                          "directory")
    _remove_stale(parent, out.name)
    if needed_bytes:
        free = shutil.disk_usage(parent).free
        if free < needed_bytes:
            raise OutputError(f"not enough space for {out}: it needs {format_bytes(needed_bytes)}, the disk has "
                              f"{format_bytes(free)} free; free space or choose another disk")
    try:
        tmp = _fresh_dir(parent, out.name, _TMP_TAG)
    except OSError as exc:
        raise (_disk_error(exc, out, needed_bytes) or exc) from exc
    try:
        yield tmp
        if out.exists():
            if not overwrite and any(out.iterdir()):  # something appeared while we were writing
                raise OutputError(f"output {out} was filled by someone else during the conversion; pass "
                                  "--overwrite (overwrite=True) to replace it")
            old = _fresh_dir(parent, out.name, _OLD_TAG)
            os.replace(out, old / "previous")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "previous", out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = _disk_error(exc, out, needed_bytes)
        if error is None:
            raise
        raise error from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
