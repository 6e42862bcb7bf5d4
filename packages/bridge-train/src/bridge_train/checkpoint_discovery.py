"""Which checkpoint a run resumes from, and whether its files are whole.

A checkpoint root holds ``iter_NNNNNNN/`` directories and the ``latest_checkpointed_iteration.txt`` tracker. The
tracker can be missing (deleted, a copy made without it) while complete iterations are there: starting from
iteration 1 would then overwrite them, so the newest complete iteration is used instead. The newest iteration can
also be damaged (a copy cut short, a disk that filled up): its files are checked against the dist-checkpoint's own
``.metadata`` (every shard file present and at least as long as the byte ranges it must hold) before megatron-core
reads it, so the error names the bad file and the previous complete checkpoint, instead of a raw DCP error.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from bridge_convert.megatron_ckpt import METADATA_FILE, TRACKER_FILE

__all__ = ["CheckpointError", "MissingCheckpointError", "checkpoint_problem", "complete_iterations",
           "find_resume_checkpoint", "hf_model_directory_problem", "save_dir_problem",
           "unreadable_checkpoint_error"]

logger = logging.getLogger("bridge")

ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_DCP_METADATA = ".metadata"
_MEGATRON_FILES = ("metadata.json",)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or written as asked; the message names the path and the fix."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """The run needs a checkpoint that is not there (``exit_on_missing_checkpoint``, ``finetune`` without weights);
    also a ``FileNotFoundError``."""


def complete_iterations(root: Path) -> list[tuple[int, Path]]:
    """``(iteration, directory)`` of every complete iteration directory under ``root``, oldest first."""
    found = []
    for child in root.iterdir() if root.is_dir() else ():
        match = ITER_DIR.match(child.name)
        if match and child.is_dir() and (child / METADATA_FILE).exists():
            found.append((int(match.group(1)), child))
    return sorted(found)


def hf_model_directory_problem(load_dir: str) -> str | None:
    """The message for an HF model directory given as ``checkpoint.load`` (a ``config.json`` and no checkpoint of a
    run in it: a run would silently start without its weights), else None."""
    root = Path(load_dir)
    if (root / "config.json").is_file() and not (root / TRACKER_FILE).exists() and not complete_iterations(root):
        return (f"checkpoint.load={load_dir} is an HF model directory (config.json), not a checkpoint of a run: to "
                f"train from its weights set checkpoint.pretrained_checkpoint={load_dir}; checkpoint.load is where a "
                "run resumes from (its checkpoint.save directory)")
    return None


def save_dir_problem(save_dir: str, resume: Path | None) -> str | None:
    """The message for a ``checkpoint.save`` directory holding complete checkpoints the run does not resume from
    (its saves would move that run's tracker back, ``keep_last_n`` would delete its checkpoints, and a save of an
    iteration it holds would be refused hours in), else None."""
    root = Path(save_dir)
    complete = complete_iterations(root)
    if not complete or (resume is not None and resume.resolve().parent == root.resolve()):
        return None
    this_run = "starts fresh" if resume is None else f"resumes from {resume}, outside it"
    return (f"checkpoint.save={save_dir} holds {len(complete)} checkpoint(s) of another run (newest "
            f"{complete[-1][1].name}) and this run {this_run}; to continue that run set checkpoint.load={save_dir}, "
            "or save to an empty directory")


def checkpoint_problem(directory: Path) -> str | None:
    """What is wrong with the files of one iteration directory, or None when they are whole.

    Checks presence and sizes only (no data is read beyond the small ``.metadata``), so it costs milliseconds.
    """
    if not (directory / METADATA_FILE).exists():
        return f"{directory / METADATA_FILE} is missing (the save did not finish)"
    for name in (_DCP_METADATA, *_MEGATRON_FILES):
        if not (directory / name).is_file():
            return f"{directory / name} is missing"
    for name in (METADATA_FILE, *_MEGATRON_FILES):  # small JSON files read before (or while) the weights load
        try:
            json.loads((directory / name).read_text(encoding="utf-8"))
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
            return f"{directory / name} is not valid JSON ({exc})"
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as exc:  # a truncated or garbled pickle raises anything from EOFError to UnpicklingError
        return f"{directory / _DCP_METADATA} is unreadable ({type(exc).__name__}: {exc})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        actual = path.stat().st_size
        if actual < size:
            return f"{path} is truncated ({actual:,} bytes, the checkpoint's .metadata needs {size:,})"
    return None


def _previous_complete(root: Path, before: int) -> Path | None:
    for iteration, directory in reversed(complete_iterations(root)):
        if iteration < before and checkpoint_problem(directory) is None:
            return directory
    return None


def unreadable_checkpoint_error(directory: Path, exc: BaseException) -> CheckpointError:
    """A checkpoint whose files passed :func:`checkpoint_problem` but whose data megatron-core / DCP cannot read (a
    shard overwritten in place): the error names it and the previous complete checkpoint."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    previous = _previous_complete(directory.parent, int(directory.name[5:])) if ITER_DIR.match(directory.name) \
        else None
    hint = (f"resume from the previous complete checkpoint with checkpoint.load={previous}" if previous is not None
            else "no earlier complete checkpoint exists")
    return CheckpointError(f"cannot read the checkpoint {directory} ({reason}): its files are damaged; {hint}")


def find_resume_checkpoint(load_dir: str | None, *, fallback_to_previous: bool = False,
                           say=print) -> Path | None:
    """The iteration directory to resume from, or None when ``load_dir`` holds no checkpoint yet.

    ``load_dir`` is a checkpoint root (the tracker names the iteration; without a tracker, or with a whole
    iteration newer than the tracker's, which a process killed between a save's rename and its tracker update
    leaves, the newest complete iteration is taken and ``say`` reports it) or one iteration directory.

    Raises:
        CheckpointError: the chosen checkpoint's files are damaged (naming the file and the previous complete
            checkpoint), unless ``fallback_to_previous`` and a previous complete one exists: then it is used, and
            the damaged directory is renamed ``iter_N.damaged`` (kept, so the run can save its own iteration N).
    """
    if not load_dir:
        return None
    root = Path(load_dir)
    if (root / METADATA_FILE).exists():  # an iteration directory named directly
        problem = checkpoint_problem(root)
        if problem:
            raise CheckpointError(f"cannot resume from checkpoint.load={load_dir}: {problem}")
        return root
    if ITER_DIR.match(root.name.removesuffix(".tmp")) or root.name.endswith(".damaged"):
        previous = _previous_complete(root.parent, int(root.name[5:].split(".")[0]))
        hint = f"; the previous complete checkpoint is checkpoint.load={previous}" if previous else ""
        raise CheckpointError(f"checkpoint.load={load_dir} is not a complete checkpoint ({checkpoint_problem(root)})"
                              f"{hint}")
    tracker = root / TRACKER_FILE
    if tracker.exists():
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise CheckpointError(f"{tracker} should hold an iteration number, found {text!r}; write the number "
                                  f"of the newest complete iter_* directory into it, or delete it")
        iteration = int(text)
        target = root / f"iter_{iteration:07d}"
        newer = [(i, d) for i, d in complete_iterations(root) if i > iteration and checkpoint_problem(d) is None]
        if newer:  # a save finished its directory and the process died before it moved the tracker
            iteration, target = newer[-1]
            say(f"{tracker} names iteration {text} but {target.name} is complete and newer (a save interrupted "
                f"before the tracker moved): resuming from {target.name}; to resume from iteration {text} set "
                f"checkpoint.load={root / f'iter_{int(text):07d}'} and move the newer iter_* directories away")
            return target
    else:
        complete = complete_iterations(root)
        if not complete:
            problem = hf_model_directory_problem(load_dir)
            if problem:
                raise CheckpointError(problem)
            return None
        iteration, target = complete[-1]
        say(f"{root} has no {TRACKER_FILE}: resuming from the newest complete checkpoint {target.name}")
    problem = checkpoint_problem(target) if target.is_dir() else f"{target} does not exist (named by {tracker})"
    if problem is None:
        return target
    previous = _previous_complete(root, iteration)
    if previous is not None and fallback_to_previous:
        aside = target.with_name(target.name + ".damaged")
        moved = ""
        try:  # every rank gets here; one of them moves it
            target.rename(aside)
            moved = f"; moved the damaged directory to {aside.name}"
        except OSError:
            pass
        say(f"checkpoint {target} is damaged: {problem}; falling back to the previous complete checkpoint "
            f"{previous.name} (checkpoint.fallback_to_previous){moved}")
        return previous
    hint = (f"resume from the previous complete checkpoint with checkpoint.load={previous} (or set "
            "checkpoint.fallback_to_previous=true)" if previous is not None
            else "no earlier complete checkpoint exists; start fresh with another checkpoint.load")
    raise CheckpointError(f"cannot resume from {target}: {problem}; {hint}")
