"""checkpoint.async_save: training goes on while a forked writer saves; the checkpoint becomes the latest only when
complete, and resuming from it reproduces the uninterrupted run bitwise. (A SIGKILL during the background write
is in test_signals.py.)"""

from __future__ import annotations

import errno
import time

import pytest

from bridge_convert.megatron_ckpt import TRACKER_FILE
from bridge_train import CheckpointError, pretrain


@pytest.fixture
def slow_writer(monkeypatch):
    """Every background write takes 3 s more (in the forked writer process)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    real_write = FileSystemWriterAsync.write_preloaded_data_multithread

    def slow_write(*args, **kwargs):
        time.sleep(3)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(FileSystemWriterAsync, "write_preloaded_data_multithread", staticmethod(slow_write))


def test_training_continues_during_an_async_save_and_the_checkpoint_resumes_bitwise(run_config, tmp_path,
                                                                                      monkeypatch, slow_writer):
    import bridge_train.loop as loop

    ckpt = tmp_path / "ckpt"
    seen = []
    real_step = loop.train_step

    def step(run, forward_step, iteration):
        seen.append((iteration, (ckpt / TRACKER_FILE).exists(), (ckpt / "iter_0000003.tmp").exists()))
        return real_step(run, forward_step, iteration)

    monkeypatch.setattr(loop, "train_step", step)
    first = pretrain(run_config(**{"train.train_iters": 6, "checkpoint.save": str(ckpt),
                                   "checkpoint.save_interval": 3, "checkpoint.async_save": True}))
    # Iteration 4 ran while the files of iteration 3 were still being written (not yet the latest).
    assert (4, False, True) in seen
    assert (ckpt / TRACKER_FILE).read_text().strip() == "6"
    assert (ckpt / "iter_0000003" / "bridge.json").exists() and not (ckpt / "iter_0000003.tmp").exists()
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = pretrain(run_config(**{"train.train_iters": 6, "checkpoint.load": str(ckpt / "iter_0000003")}))
    assert list(resumed) == first[3:]  # weights, Adam state and RNG were saved as they were at iteration 3


def test_a_failed_background_write_is_one_line_and_the_previous_checkpoint_stays(run_config, tmp_path,
                                                                                 monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    real_write = filesystem_async.FileSystemWriterAsync.write_preloaded_data_multithread

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def write(transform_list, use_msc, rank, write_buckets, results_queue):  # runs in the forked writer
        if any("iter_0000004.tmp" in bucket[0] for bucket in write_buckets):
            filesystem_async._write_item = full_disk  # this child's copy only: the disk is full for iteration 4
        return real_write(transform_list, use_msc, rank, write_buckets, results_queue)

    monkeypatch.setattr(filesystem_async.FileSystemWriterAsync, "write_preloaded_data_multithread",
                        staticmethod(write))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match=r"the background save to .*iter_0000004\.tmp failed \(.*\); the "
                                              r"previous checkpoint stays the latest"):
        pretrain(run_config(**{"train.train_iters": 4, "checkpoint.save": str(ckpt), "checkpoint.save_interval": 2,
                               "checkpoint.async_save": True}))
    assert (ckpt / TRACKER_FILE).read_text().strip() == "2"


def test_a_run_that_fails_while_a_background_save_is_in_flight_finishes_that_save_first(run_config, tmp_path,
                                                                                         monkeypatch, capsys,
                                                                                         slow_writer):
    import bridge_train.loop as loop

    ckpt = tmp_path / "ckpt"
    real_step = loop.train_step

    def step(run, forward_step, iteration):
        if iteration == 5:
            assert (ckpt / "iter_0000004.tmp").exists()  # iteration 4's save is still being written
            raise RuntimeError("a bug in the user's forward step")
        return real_step(run, forward_step, iteration)

    monkeypatch.setattr(loop, "train_step", step)
    with pytest.raises(RuntimeError, match="a bug in the user's forward step"):
        pretrain(run_config(**{"train.train_iters": 8, "checkpoint.save": str(ckpt), "checkpoint.save_interval": 4,
                               "checkpoint.async_save": True}))
    assert "finishing the background checkpoint save in flight first" in capsys.readouterr().out
    assert (ckpt / TRACKER_FILE).read_text().strip() == "4"
    assert (ckpt / "iter_0000004" / "bridge.json").exists() and not (ckpt / "iter_0000004.tmp").exists()
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = pretrain(run_config(**{"train.train_iters": 6, "checkpoint.load": str(ckpt)}))
    assert len(list(resumed)) == 2  # resumed at iteration 4, not from scratch
