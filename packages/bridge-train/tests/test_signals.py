"""Process-level robustness: SIGTERM and SIGINT (Ctrl-C) save a final checkpoint; SIGKILL in the middle of a save
(synchronous, or asynchronous with the writer in the background) leaves the previous checkpoint intact and
`latest` pointing at it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge_convert.megatron_ckpt import TRACKER_FILE
from bridge_train import pretrain

SCRIPT = '''
import os, sys, time
sys.path.insert(0, {tests!r})
from train_helpers import make_run_config
from bridge_train import pretrain

def main():
    mode, ckpt, marker = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "kill-in-save":
        from megatron.core import dist_checkpointing
        real_save = dist_checkpointing.save
        calls = []
        def save(*args, **kwargs):
            calls.append(1)
            out = real_save(*args, **kwargs)
            if len(calls) == 2:  # the files of the second checkpoint are written, not yet renamed into place
                open(marker, "w").write("saving")
                time.sleep(600)
            return out
        dist_checkpointing.save = save
        cfg = make_run_config({hf!r}, **{{"train.train_iters": 20, "checkpoint.save": ckpt,
                                           "checkpoint.save_interval": 5}})
    elif mode == "kill-in-async-save":
        from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
        real_write = FileSystemWriterAsync.write_preloaded_data_multithread
        def write(transform_list, use_msc, rank, write_buckets, results_queue):
            # runs in the forked writer process, while the trainer goes on
            if any("iter_0000010.tmp" in bucket[0] for bucket in write_buckets):
                open(marker, "w").write("writing")
                time.sleep(600)
            return real_write(transform_list, use_msc, rank, write_buckets, results_queue)
        FileSystemWriterAsync.write_preloaded_data_multithread = staticmethod(write)
        import bridge_train.loop as loop
        real_step = loop.train_step
        def step(run, fs, iteration):
            if iteration == 12:  # the trainer went on while the writer of iteration 10 is still busy
                open(marker + ".12", "w").write("running")
            return real_step(run, fs, iteration)
        loop.train_step = step
        cfg = make_run_config({hf!r}, **{{"train.train_iters": 20, "checkpoint.save": ckpt,
                                           "checkpoint.save_interval": 5, "checkpoint.async_save": True}})
    else:
        cfg = make_run_config({hf!r}, **{{"train.train_iters": 100000, "checkpoint.save": ckpt,
                                           "logger.log_interval": 1}})
        import bridge_train.loop as loop
        real_step = loop.train_step
        def step(run, fs, iteration):
            if iteration == 4:
                open(marker, "w").write("running")
            return real_step(run, fs, iteration)
        loop.train_step = step
    pretrain(cfg)
    print("clean exit", flush=True)

if __name__ == "__main__":
    main()
'''


def _launch(tmp_path: Path, hf: str, mode: str) -> tuple[subprocess.Popen, Path, Path]:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), hf=hf))
    ckpt, marker = tmp_path / "ckpt", tmp_path / "marker"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), mode, str(ckpt), str(marker)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, ckpt, marker


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)  # with any background writer
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.2)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_termination_signal_saves_a_final_checkpoint_and_exits_cleanly(tmp_path, tiny_llama, signum):
    proc, ckpt, marker = _launch(tmp_path, tiny_llama, "signal")
    _wait_for(marker, proc)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "clean exit" in out and f"({signum.name})" in out and "Traceback" not in out
    iteration = int((ckpt / TRACKER_FILE).read_text())
    assert iteration >= 4 and (ckpt / f"iter_{iteration:07d}" / "bridge.json").exists()


@pytest.mark.parametrize("mode", ["kill-in-save", "kill-in-async-save"])
def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path, tiny_llama, run_config, mode):
    proc, ckpt, marker = _launch(tmp_path, tiny_llama, mode)
    _wait_for(marker, proc)
    if mode == "kill-in-async-save":
        _wait_for(marker.with_name(marker.name + ".12"), proc, timeout=120)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its background writers: no handler, no cleanup
    proc.communicate(timeout=60)
    assert (ckpt / TRACKER_FILE).read_text().strip() == "5"
    assert (ckpt / "iter_0000010.tmp").exists() and not (ckpt / "iter_0000010").exists()
    resumed = pretrain(run_config(**{"train.train_iters": 20, "checkpoint.load": str(ckpt),
                                     "checkpoint.save": str(ckpt), "checkpoint.save_interval": 5}))
    assert len(resumed) == 15  # iterations 6..20: it resumed from iteration 5
    assert (ckpt / TRACKER_FILE).read_text().strip() == "20"
    assert not (ckpt / "iter_0000010.tmp").exists()  # the leftover was cleaned up by a later save


def _one_rank_signalled(signals: dict[int, str]) -> str | None:
    import torch
    import torch.distributed as dist

    from bridge_train.signals import ExitRequests

    dist.init_process_group("gloo")
    exits = ExitRequests(("SIGTERM", "SIGUSR1"), enabled=True, exit_duration_in_mins=None,
                         device=torch.device("cpu"))
    try:
        if dist.get_rank() in signals:
            os.kill(os.getpid(), getattr(signal, signals[dist.get_rank()]))
        return exits.should_exit()
    finally:
        exits.close()


@pytest.mark.parametrize("signals", [{1: "SIGTERM"}, {0: "SIGUSR1", 2: "SIGTERM"}], ids=["one", "two_kinds"])
def test_a_signal_on_one_rank_stops_every_rank_under_its_name(signals):
    """The other ranks reported "signal on another rank": a script branching on the reason (the example exits
    128 + signal without exporting) then ran a collective export on some ranks only, and hung or crashed."""
    from bridge_convert.testing.distributed import run_multiprocess

    assert run_multiprocess(_one_rank_signalled, 3, signals) == ["SIGTERM"] * 3
