"""The one place where megatron-core is taught to run on a machine without CUDA, for as long as the runtime lives.

megatron-core 0.19 assumes a CUDA device in a handful of places (device placement through
``torch.cuda.current_device()``, the CUDA RNG tracker, hard-coded ``device="cuda"`` buffers, stream and
synchronize calls, ``tensor.type() == "torch.cuda.FloatTensor"`` checks, ``tensor.cuda()`` moves). Each patch
below names what it changes and why.

The patches are scoped: :func:`apply_cpu_compat` (called by ``initialize_parallel`` when
``torch.cuda.is_available()`` is False) records every attribute it replaces, and :func:`remove_cpu_compat`
(called by ``destroy_parallel``) puts each one back, so after the runtime is torn down ``torch.cuda``,
``torch.Tensor`` and megatron-core are exactly what they were. :func:`cpu_compat` is the same as a context
manager. On a GPU machine nothing here is ever touched.

``Tensor.type`` and ``Tensor.cuda`` are never replaced for the whole process: only the megatron-core functions
that need a CUDA view of CPU tensors (listed in ``_CUDA_VIEW_CALLERS``) are wrapped, and the CUDA view is in force
only while one of them runs (on the calling thread's stack; another thread's ``.type()`` during such a call sees
it too, which no caller of these setup-time functions does).

Every patch has a smoke test (``tests/runtime/test_cpu_compat.py``) that calls the megatron-core code path
it exists for, so an upgrade that moves an internal fails loudly instead of silently.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["CPU_PATCHES", "CpuPatch", "apply_cpu_compat", "applied_patches", "cpu_compat", "remove_cpu_compat"]

_CPU = torch.device("cpu")
_MISSING = object()


class _Undo:
    """Every attribute a patch replaced (owner, name, what was there) and every other step to take back."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], None]] = []

    def set(self, owner, name: str, value) -> None:
        """``setattr(owner, name, value)``, remembering the owner's own entry (a class's raw descriptor, or
        nothing when the attribute was inherited) so that undoing restores exactly that."""
        old = vars(owner).get(name, _MISSING)
        setattr(owner, name, value)
        self._steps.append(lambda: delattr(owner, name) if old is _MISSING else setattr(owner, name, old))

    def on_undo(self, step: Callable[[], None]) -> None:
        self._steps.append(step)

    def undo(self) -> None:
        while self._steps:
            self._steps.pop()()


@dataclass(frozen=True, slots=True)
class CpuPatch:
    name: str
    reason: str
    apply: Callable[[_Undo], None]


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _patch_current_device(undo: _Undo) -> None:
    # ~30 call sites pass `device=torch.cuda.current_device()` (RoPE, TP layers, DDP buffers, p2p, ...).
    undo.set(torch.cuda, "current_device", lambda: _CPU)


class _CpuRngLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_rng(undo: _Undo) -> None:
    # The model-parallel RNG tracker stores and swaps CUDA generator states; route it to the CPU generator so
    # that dropout inside tracker forks and TP-rank-specific seeds keep their semantics on CPU.
    from megatron.core.tensor_parallel import random as mp_random

    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    undo.set(torch.cuda, "get_rng_state", get_rng_state)
    undo.set(torch.cuda.random, "get_rng_state", get_rng_state)
    undo.set(torch.cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state))
    # The tracker's add() seeds "the CUDA generator" and reads it back: seed the CPU generator it now reads.
    undo.set(torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    undo.set(mp_random, "_set_cuda_rng_state", set_rng_state)
    # The tracker warns whenever the CPU generator moves inside a fork, which is now always the case.
    logger, quiet = logging.getLogger(mp_random.__name__), _CpuRngLogFilter()
    logger.addFilter(quiet)
    undo.on_undo(lambda: logger.removeFilter(quiet))


def _patch_synchronize(undo: _Undo) -> None:
    # p2p communication (pipeline schedules) and dist-checkpointing's tensor preload call it unconditionally.
    undo.set(torch.cuda, "synchronize", lambda device=None: None)


class _DummyStream:
    """Stands in for a CUDA stream: on CPU every op is already ordered."""

    def wait_event(self, event) -> None: ...
    def wait_stream(self, stream) -> None: ...
    def record_event(self, event=None):
        return None
    def synchronize(self) -> None: ...
    def query(self) -> bool:
        return True


def _patch_streams(undo: _Undo) -> None:
    # DDP's grad sync (param_and_grad_buffer.start_grad_sync) asks for the current stream.
    stream = _DummyStream()
    undo.set(torch.cuda, "current_stream", lambda device=None: stream)
    undo.set(torch.cuda, "default_stream", lambda device=None: stream)


# Modules that build small buffers with a hard-coded device="cuda" (schedules' token counters, the optimizers'
# found_inf / scale tensors, clip-grad norms, the default causal mask, DDP's warm-up tensor, broadcast_data).
_HARDCODED_CUDA_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.transformer.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
)

_FACTORIES = frozenset(
    {"zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint", "as_tensor", "zeros_like",
     "ones_like", "empty_like", "full_like"}
)


class _CpuTorch(types.ModuleType):
    """A view of ``torch`` whose tensor factories map a CUDA ``device`` to the CPU.

    It replaces the ``torch`` global of the modules above only, so every other op keeps torch's own
    dispatch (a TorchFunctionMode would tax every op of the model instead).
    """

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        attr = getattr(torch, name)
        if name not in _FACTORIES:
            return attr

        def factory(*args, **kwargs):
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = _CPU
            return attr(*args, **kwargs)

        return factory


def _patch_hardcoded_cuda(undo: _Undo) -> None:
    proxy = _CpuTorch()
    for name in _HARDCODED_CUDA_MODULES:
        module = importlib.import_module(name)
        if vars(module).get("torch") is not torch:
            raise RuntimeError(f"{name} no longer binds `torch` at module level; update the CPU compat layer")
        undo.set(module, "torch", proxy)


# The megatron-core functions that check `tensor.type() == "torch.cuda.FloatTensor"` (the clip-grad assert, the
# float16 and distributed optimizers' parameter-type checks) or move tensors with `.cuda()` (the tied-embedding
# all-reduce under PP, broadcast_data, the DP param-hash check, the distributed optimizer's state gather, the
# fully parallel checkpoint load's tensor exchange). While one of them runs, CPU tensors report a CUDA type and
# `.cuda()` leaves them where they are.
_CUDA_VIEW_CALLERS = (
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero"),
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"),
    ("megatron.core.tensor_parallel.data", "broadcast_data"),
    ("megatron.core.utils", "check_param_hashes_across_dp_replicas"),
    ("megatron.core.dist_checkpointing.exchange_utils", "exchange_loaded_tensors_gather_rounds"),
    ("megatron.core.dist_checkpointing.exchange_utils", "exchange_loaded_tensors_broadcast"),
)

_views_depth = 0


@contextmanager
def _cuda_tensor_views() -> Iterator[None]:
    """While inside: ``cpu_tensor.type()`` says ``torch.cuda.*Tensor`` and ``cpu_tensor.cuda()`` returns it."""
    global _views_depth
    undo = _Undo()
    if _views_depth == 0:
        original_type, original_cuda = torch.Tensor.type, torch.Tensor.cuda

        def type_(self, *args, **kwargs):
            if not args and not kwargs and self.device.type == "cpu":
                return original_type(self).replace("torch.", "torch.cuda.", 1)
            return original_type(self, *args, **kwargs)

        def cuda(self, *args, **kwargs):
            return self if self.device.type == "cpu" else original_cuda(self, *args, **kwargs)

        undo.set(torch.Tensor, "type", functools.wraps(original_type)(type_))
        undo.set(torch.Tensor, "cuda", functools.wraps(original_cuda)(cuda))
    _views_depth += 1
    try:
        yield
    finally:
        _views_depth -= 1
        undo.undo()


def _with_cuda_views(func: Callable) -> Callable:
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with _cuda_tensor_views():
            return func(*args, **kwargs)

    return wrapper


def _patch_tensor_type_and_cuda(undo: _Undo) -> None:
    for module_name, qualname in _CUDA_VIEW_CALLERS:
        module = importlib.import_module(module_name)
        owner_name, _, attr = qualname.rpartition(".")
        owner = getattr(module, owner_name) if owner_name else module
        raw = vars(owner).get(attr)
        func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
        if not callable(func):
            raise RuntimeError(f"{module_name}.{qualname} is gone; update the CPU compat layer")
        wrapper = _with_cuda_views(func)
        if func is not raw:
            wrapper = type(raw)(wrapper)  # keep it a static / class method
        undo.set(owner, attr, wrapper)
        if owner_name:
            continue
        # A module-level function is also bound by name elsewhere (`from .data import broadcast_data`).
        for other in [m for n, m in sys.modules.items() if n.startswith("megatron.") and m is not None]:
            for key, value in list(vars(other).items()):
                if value is raw:
                    undo.set(other, key, wrapper)


CPU_PATCHES: tuple[CpuPatch, ...] = (
    CpuPatch("current_device", "device=torch.cuda.current_device() call sites place tensors on the CPU",
             _patch_current_device),
    CpuPatch("rng_tracker", "the CUDA RNG tracker forks the CPU generator", _patch_rng),
    CpuPatch("synchronize", "torch.cuda.synchronize() in p2p and checkpoint preload is a no-op",
             _patch_synchronize),
    CpuPatch("streams", "DDP grad sync waits on torch.cuda.current_stream(); a dummy stream orders nothing",
             _patch_streams),
    CpuPatch("hardcoded_cuda_buffers", "device='cuda' buffers in schedules/optimizers/masks are made on CPU",
             _patch_hardcoded_cuda),
    CpuPatch("tensor_type_and_cuda", "inside the megatron-core functions that check for CUDA tensor types or "
             "call .cuda(), CPU tensors pass as CUDA ones", _patch_tensor_type_and_cuda),
)

_undo = _Undo()
_applied: list[str] = []


def applied_patches() -> tuple[str, ...]:
    """Names of the patches in effect in this process (empty on a CUDA machine and after removal)."""
    return tuple(_applied)


def apply_cpu_compat() -> tuple[str, ...]:
    """Apply every CPU patch; a no-op when CUDA is available or the patches are already in.

    Returns:
        The names of the patches in effect.
    """
    if torch.cuda.is_available() or _applied:
        return applied_patches()
    import megatron.core  # noqa: F401  (import first: some patches replace module attributes)

    try:
        for patch in CPU_PATCHES:
            patch.apply(_undo)
            _applied.append(patch.name)
    except BaseException:
        remove_cpu_compat()
        raise
    logging.getLogger(__name__).debug("megatron-core CPU compat patches: %s", ", ".join(_applied))
    return applied_patches()


def remove_cpu_compat() -> None:
    """Put back everything :func:`apply_cpu_compat` replaced; a no-op when nothing is applied."""
    _undo.undo()
    _applied.clear()


@contextmanager
def cpu_compat() -> Iterator[tuple[str, ...]]:
    """The CPU patches for the duration of a ``with`` block (removed at its end unless they were already in).

    Yields:
        The names of the patches in effect.
    """
    already = bool(_applied)
    names = apply_cpu_compat()
    try:
        yield names
    finally:
        if not already:
            remove_cpu_compat()
