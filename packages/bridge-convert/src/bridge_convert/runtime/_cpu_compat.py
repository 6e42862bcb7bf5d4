"""The one place where megatron-core is taught to run on a machine without CUDA.

megatron-core 0.19 assumes a CUDA device in a handful of places (device placement through
``torch.cuda.current_device()``, the CUDA RNG tracker, hard-coded ``device="cuda"`` buffers, stream and
synchronize calls, ``tensor.type() == "torch.cuda.FloatTensor"`` asserts). Each patch below names what it
changes and why. They are applied once per process by :func:`apply_cpu_compat`, which the runtime calls only
when ``torch.cuda.is_available()`` is False: on a GPU machine nothing here is ever touched.

Every patch has a smoke test (``tests/runtime/test_cpu_compat.py``) that calls the megatron-core code path
it exists for, so an upgrade that moves an internal fails loudly instead of silently.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["CPU_PATCHES", "CpuPatch", "apply_cpu_compat", "applied_patches"]

_CPU = torch.device("cpu")


@dataclass(frozen=True, slots=True)
class CpuPatch:
    name: str
    reason: str
    apply: Callable[[], None]


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _patch_current_device() -> None:
    # ~30 call sites pass `device=torch.cuda.current_device()` (RoPE, TP layers, DDP buffers, p2p, ...).
    torch.cuda.current_device = lambda: _CPU


class _CpuRngLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_rng() -> None:
    # The model-parallel RNG tracker stores and swaps CUDA generator states; route it to the CPU generator so
    # that dropout inside tracker forks and TP-rank-specific seeds keep their semantics on CPU.
    from megatron.core.tensor_parallel import random as mp_random

    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    torch.cuda.get_rng_state = get_rng_state
    torch.cuda.random.get_rng_state = get_rng_state
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    mp_random._set_cuda_rng_state = set_rng_state
    # The tracker warns whenever the CPU generator moves inside a fork, which is now always the case.
    logging.getLogger(mp_random.__name__).addFilter(_CpuRngLogFilter())


def _patch_synchronize() -> None:
    # p2p communication (pipeline schedules) and dist-checkpointing's tensor preload call it unconditionally.
    torch.cuda.synchronize = lambda device=None: None


class _DummyStream:
    """Stands in for a CUDA stream: on CPU every op is already ordered."""

    def wait_event(self, event) -> None: ...
    def wait_stream(self, stream) -> None: ...
    def record_event(self, event=None):
        return None
    def synchronize(self) -> None: ...
    def query(self) -> bool:
        return True


def _patch_streams() -> None:
    # DDP's grad sync (param_and_grad_buffer.start_grad_sync) asks for the current stream.
    stream = _DummyStream()
    torch.cuda.current_stream = lambda device=None: stream
    torch.cuda.default_stream = lambda device=None: stream


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


def _patch_hardcoded_cuda() -> None:
    proxy = _CpuTorch()
    for name in _HARDCODED_CUDA_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is not torch:
            raise RuntimeError(f"{name} no longer binds `torch` at module level; update the CPU compat layer")
        module.torch = proxy


# Modules whose code checks `tensor.type() == "torch.cuda.FloatTensor"` (clip-grad assert, the float16 and
# distributed optimizers' parameter-type checks) or moves tensors with `.cuda()` (tied-embedding all-reduce
# under PP, broadcast_data, optimizer state loading).
_CUDA_TYPE_CALLERS = ("megatron.core.",)


def _caller_is_megatron(depth: int = 2) -> bool:
    return sys._getframe(depth).f_globals.get("__name__", "").startswith(_CUDA_TYPE_CALLERS)


def _patch_tensor_type_and_cuda() -> None:
    original_type = torch.Tensor.type
    original_cuda = torch.Tensor.cuda

    def type_(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu" and _caller_is_megatron():
            return original_type(self).replace("torch.", "torch.cuda.", 1)
        return original_type(self, *args, **kwargs)

    def cuda(self, *args, **kwargs):
        if _caller_is_megatron():
            return self
        return original_cuda(self, *args, **kwargs)

    type_.__doc__ = original_type.__doc__
    cuda.__doc__ = original_cuda.__doc__
    torch.Tensor.type = type_
    torch.Tensor.cuda = cuda


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
    CpuPatch("tensor_type_and_cuda", "megatron-core's cuda tensor-type checks and .cuda() accept CPU tensors",
             _patch_tensor_type_and_cuda),
)

_applied: list[str] = []


def applied_patches() -> tuple[str, ...]:
    """Names of the patches applied in this process (empty on a CUDA machine)."""
    return tuple(_applied)


def apply_cpu_compat() -> tuple[str, ...]:
    """Apply every CPU patch once; a no-op when CUDA is available or the patches are already in.

    Returns:
        The names of the patches in effect.
    """
    if torch.cuda.is_available() or _applied:
        return applied_patches()
    import megatron.core  # noqa: F401  (import first: some patches replace module attributes)

    for patch in CPU_PATCHES:
        patch.apply()
        _applied.append(patch.name)
    logging.getLogger(__name__).debug("megatron-core CPU compat patches: %s", ", ".join(_applied))
    return applied_patches()
