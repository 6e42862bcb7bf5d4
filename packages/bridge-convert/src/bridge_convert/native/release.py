"""Release an activation's memory after its last forward use and refill it just before the backward reads it.

The shared mechanism of the native spec's cheap recomputes (:func:`.swiglu.swiglu_into_consumer`'s SwiGLU output,
:func:`.norm.recompute_output_for`'s norm outputs): a tensor that only a consumer's autograd node still holds is
shrunk to zero bytes at the storage level (every view and saved reference sees the same storage), and a hook on
the consumer's output, which fires when that output's gradient is ready, i.e. just before the consumer's backward,
resizes the storage back and recomputes its contents in place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["release_until_backward"]


def release_until_backward(tensor: Tensor, hook_tensor: Tensor, fill: Callable[..., None], *sources: Tensor) -> None:
    """Free ``tensor``'s storage now; refill it with ``fill(buffer, *sources)`` when ``hook_tensor``'s grad is ready.

    ``buffer`` is a tensor over the re-grown storage with ``tensor``'s layout; ``fill`` writes the recomputed
    values into it (under ``no_grad``). The hook lives as long as the graph, so it is one-shot: after the refill it
    drops the storage and the sources, which then live only as long as autograd needs them; a second backward
    through a retained graph reads the refilled tensor as it is.
    """
    storage = tensor.untyped_storage()
    nbytes = storage.nbytes()
    layout = (tensor.storage_offset(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device)
    storage.resize_(0)
    held = [storage, *sources]

    def refill(_grad: Tensor) -> None:
        if not held:
            return
        storage, *inputs = held
        held.clear()
        storage.resize_(nbytes)
        offset, shape, stride, dtype, device = layout
        buffer = torch.empty(0, dtype=dtype, device=device).set_(storage, offset, shape, stride)
        with torch.no_grad():
            fill(buffer, *inputs)

    hook_tensor.register_hook(refill)
