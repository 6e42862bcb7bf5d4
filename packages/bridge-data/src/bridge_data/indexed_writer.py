"""Writing megatron-core indexed datasets safely: temporary files renamed into place, never anyone else's file.

A writer puts its data in ``.PREFIX.XXXXXXXX.bin.tmp`` (and, when finishing, ``.idx.tmp``) next to the output
and renames both into place only when complete, the ``.idx`` last (an old ``.idx`` is removed first), so a crash
never leaves a ``.bin``/``.idx`` pair that looks valid but is not. While it works it holds an exclusive
``flock`` on its ``.bin.tmp``: a run that is killed (the lock dies with the process) leaves temporaries that the
next run into the same prefix recognises by name and removes, without ever touching a live run's files or
anything this package did not name. Without ``overwrite`` an output that another run put in place meanwhile is
not replaced either: the rename refuses an existing name. Files are created with mode ``0o666`` minus the umask,
as ``open()`` does.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil

import numpy as np

__all__ = ["IndexedWriter", "OutputError", "OutputExistsError", "check_outputs", "remove_stale_temporaries"]

logger = logging.getLogger(__name__)

_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


class OutputError(OSError):
    """An output that cannot be written (exists, is an input, read-only or full disk); the message says
    which path and what to do."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class OutputExistsError(OutputError, FileExistsError):
    """An output that exists (and ``overwrite`` is off, or it is not a file)."""


def _temp_pattern(prefix: str) -> re.Pattern:
    base = os.path.basename(prefix)
    # 8 characters: this module's token_hex(4), or tempfile's alphabet (the names earlier versions used).
    return re.compile(rf"\.{re.escape(base)}\.[a-z0-9_]{{8}}\.(bin|idx)\.tmp")


def _is_locked(path: str) -> bool:
    """Whether a live writer holds ``path`` (its ``.bin.tmp``); False when it is free or gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def remove_stale_temporaries(prefix: str) -> list[str]:
    """Remove the temporaries that an interrupted run into ``prefix`` left behind; say so for each.

    Only files named as :class:`IndexedWriter` names them are considered, and a file whose writer is still
    running (it holds the lock) is left alone.

    Returns:
        The paths removed.
    """
    directory = os.path.dirname(os.path.abspath(prefix))
    pattern = _temp_pattern(prefix)
    try:
        names = sorted(n for n in os.listdir(directory) if pattern.fullmatch(n))
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        path = os.path.join(directory, name)
        owner = path if name.endswith(".bin.tmp") else path[: -len(".idx.tmp")] + ".bin.tmp"
        if _is_locked(owner):
            logger.warning("kept %s: another bridge-data preprocess is writing it", path)
            continue
        try:
            size = os.path.getsize(path)
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path)
        logger.warning("removed %s (%d bytes), left by an interrupted bridge-data preprocess run", path, size)
    return removed


def check_outputs(outputs: list[str], inputs: list[str], *, overwrite: bool) -> None:
    """Refuse outputs that exist (unless ``overwrite``), that are not files, or that are (inside) an input.

    Raises:
        OutputError: naming the output and the fix.
    """
    sources = [os.path.realpath(p) for p in inputs]
    for out in outputs:
        real = os.path.realpath(out)
        for src in sources:
            if real == src or real.startswith(src.rstrip(os.sep) + os.sep):
                raise OutputError(errno.EINVAL, f"output {out} is the input {src} or inside it; choose another "
                                  "--output-prefix (--overwrite never replaces an input)")
        if os.path.lexists(out) and not os.path.isfile(out):
            raise OutputExistsError(errno.EEXIST, f"output {out} exists and is not a file; choose another "
                              "--output-prefix")
        if os.path.lexists(out) and not overwrite:
            raise OutputExistsError(errno.EEXIST, f"output {out} exists; pass --overwrite (overwrite=True) to replace "
                              "it, or choose another --output-prefix")


def _place_new(tmp: str, final: str) -> None:
    """Rename ``tmp`` to ``final`` unless ``final`` exists (FileExistsError): a hard link is atomic and refuses an
    existing name (``os.replace`` would not); where links are not supported, a check just before the rename."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, "exists", final) from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


def _create_temp(directory: str, base: str) -> tuple[int, str]:
    while True:
        path = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.bin.tmp")
        try:
            return os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666), path  # the umask applies
        except FileExistsError:
            continue


def disk_error(exc: OSError, path: str, written: int | None = None, more: int | None = None) -> OSError:
    """``exc`` rephrased as one line naming ``path`` (and, when known, the bytes written and still needed)."""
    if isinstance(exc, OutputError):
        return exc
    directory = os.path.dirname(os.path.abspath(path))
    if exc.errno in _OUT_OF_SPACE:
        free = shutil.disk_usage(directory).free if os.path.isdir(directory) else None
        parts = [f"no space left writing {path}"]
        if written is not None:
            parts.append(f"after {written:,} bytes")
        if more is not None:
            parts.append(f"about {more:,} more bytes needed")
        if free is not None:
            parts.append(f"{free:,} bytes free in {directory}")
        return OutputError(exc.errno, ", ".join(parts) + "; free some space or choose another --output-prefix")
    if exc.errno in _NOT_WRITABLE:
        return OutputError(exc.errno, f"cannot write {path}: {exc.strerror or exc}; choose a writable "
                           "--output-prefix")
    return exc


class IndexedWriter:
    """An ``IndexedDatasetBuilder`` writing to temporary files that :meth:`commit` renames into place.

    Args:
        prefix: Output path prefix (``PREFIX.bin`` / ``PREFIX.idx``).
        dtype: Token dtype of the ``.bin``.
    """

    def __init__(self, prefix: str, dtype: type[np.number]) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        directory, base = os.path.split(os.path.abspath(prefix))
        try:
            self._lock_fd, self._tmp_bin = _create_temp(directory, base)
        except OSError as exc:
            raise disk_error(exc, directory) from exc
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # held until commit/discard: a live writer's files stay
        self._tmp_idx = self._tmp_bin[: -len(".bin.tmp")] + ".idx.tmp"
        self._builder = IndexedDatasetBuilder(self._tmp_bin, dtype=dtype)
        self._itemsize = np.dtype(dtype).itemsize
        self.num_documents = 0
        self.num_tokens = 0
        self._done = False
        self._linked: list[tuple[str, int]] = []  # (output, inode) put in place by publish without overwrite

    @property
    def bytes_written(self) -> int:
        return self.num_tokens * self._itemsize

    def add_document(self, ids: list[int]) -> None:
        try:
            self._builder.add_document(np.asarray(ids), [len(ids)])
        except OSError as exc:
            raise disk_error(exc, self._tmp_bin, self.bytes_written) from exc
        self.num_documents += 1
        self.num_tokens += len(ids)

    def commit(self, *, overwrite: bool = True) -> None:
        """:meth:`finish`, then :meth:`publish`."""
        self.finish()
        self.publish(overwrite=overwrite)

    def finish(self) -> None:
        """Write the index and flush both temporary files to disk (nothing is renamed yet)."""
        try:
            self._builder.finalize(self._tmp_idx)
            for tmp in (self._tmp_bin, self._tmp_idx):
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise disk_error(exc, self._tmp_idx, self.bytes_written) from exc

    def publish(self, *, overwrite: bool) -> None:
        """Rename the finished files into place: replacing an older pair with ``overwrite``, else only where no
        output exists at this moment (another run may have written one since the start).

        Raises:
            OutputExistsError: without ``overwrite``, an output exists now; nothing of this writer is in place.
        """
        final_bin, final_idx = self.prefix + ".bin", self.prefix + ".idx"
        if overwrite:
            # Remove the old index first: until the new one lands, no valid-looking pair exists.
            if os.path.exists(final_idx):
                os.unlink(final_idx)
            os.replace(self._tmp_bin, final_bin)
            os.replace(self._tmp_idx, final_idx)
        else:
            for tmp, final in ((self._tmp_bin, final_bin), (self._tmp_idx, final_idx)):
                try:
                    _place_new(tmp, final)
                except FileExistsError:
                    self.retract()
                    raise OutputExistsError(errno.EEXIST, f"output {final} appeared while this run was writing "
                                            "(another run into the same prefix?); this run's output was not put "
                                            "in place; pass --overwrite, or choose another --output-prefix") from None
                self._linked.append((final, os.stat(final).st_ino))
        self._done = True
        os.close(self._lock_fd)

    def retract(self) -> None:
        """Take back what :meth:`publish` without ``overwrite`` put in place (the names still holding this
        writer's files); a failed multi-output run leaves none of its outputs."""
        for final, inode in reversed(self._linked):
            with contextlib.suppress(FileNotFoundError):
                if os.stat(final).st_ino == inode:
                    os.unlink(final)
        self._linked = []

    def discard(self) -> None:
        """Remove the temporary files of an uncommitted writer (no-op after commit)."""
        if self._done:
            return
        if not self._builder.data_file.closed:
            # A buffered tail that cannot be flushed (full disk) does not matter: the file goes anyway.
            with contextlib.suppress(OSError):
                self._builder.data_file.close()
        for tmp in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._done = True
        os.close(self._lock_fd)
