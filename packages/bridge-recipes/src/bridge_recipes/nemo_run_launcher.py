"""``bridge-run RECIPE --launcher nemo-run``: the same command, started by NeMo-Run's local executor.

NeMo-Run (the ``nemo-run`` package, imported only here) runs ``bridge-run RECIPE ...`` as a ``run.Script`` on a
``run.LocalExecutor`` with its torchrun launcher, so each of the ``N`` processes it starts builds and trains the
recipe exactly as a direct ``torchrun --nproc-per-node N $(which bridge-run) RECIPE ...`` would. Experiments
land where NeMo-Run keeps them (``NEMORUN_HOME``, default ``~/.nemo_run``).
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from collections.abc import Sequence

__all__ = ["launch", "script_and_executor"]


def _nemo_run():
    # nemo-run is deliberately not a declared extra (it pins urllib3 < 1.27 through torchx for the whole workspace;
    # see the README), so it is looked up by name at run time in whatever environment the user installed it into.
    try:
        nemo_run = importlib.import_module("nemo_run")
    except Exception as err:  # noqa: BLE001 - a broken install counts as absent
        raise ImportError(f"--launcher nemo-run needs the nemo-run package, which is not importable ({err}); "
                          "install it with `pip install nemo-run` (or use the direct launcher: torchrun "
                          "--nproc-per-node N $(which bridge-run) RECIPE ...)") from None
    return nemo_run


def _entry_script() -> str:
    """The ``bridge-run`` console script of this environment (next to the interpreter, else on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), "bridge-run")
    found = beside if os.path.exists(beside) else shutil.which("bridge-run")
    if found is None:
        raise FileNotFoundError("cannot find the bridge-run script for NeMo-Run to launch; install bridge-recipes "
                                "into this environment")
    return found


def script_and_executor(recipe: str, args: Sequence[str], *, nproc_per_node: int):
    """The ``run.Script`` and ``run.LocalExecutor`` that run ``bridge-run recipe *args`` on ``nproc_per_node``
    processes (torchrun launcher)."""
    run = _nemo_run()
    script = run.Script(path=_entry_script(), args=[*args], entrypoint="python")
    executor = run.LocalExecutor(ntasks_per_node=nproc_per_node, launcher="torchrun")
    return script, executor


def launch(recipe: str, args: Sequence[str], *, nproc_per_node: int) -> None:
    """Run the recipe through NeMo-Run and wait for it.

    Args:
        recipe: Recipe name (only names the experiment; ``args`` carry it as their first element).
        args: The ``bridge-run`` arguments, recipe first, without the launcher options.
        nproc_per_node: Processes to start.
    """
    run = _nemo_run()
    script, executor = script_and_executor(recipe, args, nproc_per_node=nproc_per_node)
    run.run(script, executor=executor, name=recipe, detach=False)
