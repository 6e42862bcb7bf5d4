"""Run a test body in N processes joined by a gloo (CPU) or NCCL (GPU) process group.

``run_multiprocess(body, 2, arg)`` starts two fresh processes (torch.multiprocessing, forkserver context),
sets the torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port)
and calls ``body(*args)`` in each. The body is found again in the children by its source file and qualified
name, so any module-level function of a test file works whatever pytest's import mode. Each rank's return
value comes back in rank order; an exception in any rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import queue
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

__all__ = ["find_free_port", "run_multiprocess"]


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_function(path: str, qualname: str, module_name: str) -> Callable[..., Any]:
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
        if module is None or os.path.abspath(getattr(module, "__file__", "") or "") != path:
            spec = importlib.util.spec_from_file_location(f"_bridge_mp_{abs(hash(path))}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _child(rank: int, world_size: int, port: int, target: tuple[str, str, str], args: tuple, env: dict,
           results) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        fn = _load_function(*target)
        value = fn(*args)
        results.put((rank, True, value))
    except BaseException:  # report everything, including assertion failures, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            from bridge_convert.runtime import destroy_parallel

            destroy_parallel()


_PRELOAD = ["torch", "megatron.core", "megatron.core.pipeline_parallel", "megatron.core.distributed",
            "megatron.core.optimizer", "megatron.core.dist_checkpointing", "transformers", "bridge_convert.runtime"]


def _context():
    """A forkserver context whose server has imported torch and megatron-core once.

    Every rank is forked from that server, so a multi-process test pays megatron-core's ~6 s import once per
    test session instead of once per rank and test. The server itself never initialises CUDA, OpenMP threads or
    a process group, so forking from it is as clean as a spawn.
    """
    if torch.cuda.is_available():
        # Importing megatron-core initialises CUDA, after which the server could not fork usable children.
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_multiprocess(
    body: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``body(*args)`` on ``world_size`` ranks and return the per-rank results.

    Args:
        body: a module-level function; it calls ``initialize_parallel(...)`` itself with the layout it tests.
        world_size: number of processes.
        *args: picklable arguments passed to every rank.
        timeout: seconds before the run is declared hung and its processes are killed.
        env: extra environment variables for the children.

    Raises:
        AssertionError: with the failing ranks' tracebacks if any rank raised, exited early, or hung.
    """
    if body.__qualname__ != body.__name__ and "<locals>" in body.__qualname__:
        raise ValueError(f"{body.__qualname__} is a local function; define it at module level")
    target = (os.path.abspath(inspect.getfile(body)), body.__qualname__, body.__module__)
    child_env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    child_env.update(env or {})
    ctx = _context()
    results = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, port, target, args, child_env, results), daemon=False)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    failures: list[str] = []
    try:
        import time

        deadline = time.monotonic() + timeout
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failures.append(f"timed out after {timeout:.0f}s; ranks without a result: "
                                f"{sorted(set(range(world_size)) - set(outcomes))}")
                break
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode is not None and i not in outcomes]
                if dead:
                    # Give a dying rank a moment to flush its result onto the queue.
                    try:
                        rank, ok, value = results.get(timeout=5.0)
                    except queue.Empty:
                        failures.append(f"ranks {dead} exited (codes {[procs[i].exitcode for i in dead]}) "
                                        "without reporting a result")
                        break
                else:
                    continue
            outcomes[rank] = (ok, value)
            if not ok:
                failures.append(f"--- rank {rank} raised ---\n{value}")
                # The other ranks are probably blocked in a collective with the failed one.
                break
    finally:
        for p in procs:
            p.join(timeout=30 if not failures else 2)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        raise AssertionError("multiprocess run failed:\n" + "\n".join(failures))
    return [outcomes[r][1] for r in range(world_size)]
