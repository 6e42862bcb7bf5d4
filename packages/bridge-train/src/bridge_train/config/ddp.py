"""Data-parallel gradient reduction settings: megatron-core's ``DistributedDataParallelConfig`` with two-phase checks."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.distributed import DistributedDataParallelConfig as MCoreDDPConfig

__all__ = ["DDPConfig"]

@dataclass(kw_only=True)
class DDPConfig(MCoreDDPConfig):
    """megatron-core's DistributedDataParallelConfig (grad_reduce_in_fp32, overlap_grad_reduce,
    overlap_param_gather, use_distributed_optimizer, bucket sizes, fp8/fp4 param gather, ...).

    Every field keeps megatron-core's name, default and docstring; pass this object to megatron-core's DDP.
    """

    def __post_init__(self) -> None:
        # megatron-core asserts on field combinations here; those checks run in finalize(), after all edits.
        self._finalized = False

    def check(self, prefix: str = "ddp") -> list[str]:
        """Problems with this config alone, as messages naming ``prefix.field``."""
        problems = []
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            problems.append(f"{prefix}.overlap_param_gather needs {prefix}.use_distributed_optimizer=true "
                            "(and optimizer.use_distributed_optimizer=true)")
        if self.reuse_grad_buf_for_mxfp8_param_ag and not self.fp8_param_gather:
            problems.append(f"{prefix}.reuse_grad_buf_for_mxfp8_param_ag needs {prefix}.fp8_param_gather=true")
        if self.num_buckets is not None:
            if self.bucket_size is not None:
                problems.append(f"{prefix}.num_buckets and {prefix}.bucket_size are both set; set one")
            if self.num_buckets < 1:
                problems.append(f"{prefix}.num_buckets must be >= 1, got {self.num_buckets}")
        if self.bucket_size is not None and self.bucket_size < 1:
            problems.append(f"{prefix}.bucket_size must be >= 1 (elements) or null, got {self.bucket_size}")
        if self.param_name_patterns_for_fp32_local_accumulation and self.grad_reduce_in_fp32:
            problems.append(f"{prefix}.param_name_patterns_for_fp32_local_accumulation is only for bf16 grad "
                            f"reduction; clear it or set {prefix}.grad_reduce_in_fp32=false")
        return problems

    def finalize(self) -> None:
        """Run megatron-core's own checks; idempotent.

        Raises:
            ValueError, AssertionError: from megatron-core (the container reports them as ``ddp: ...``).
        """
        if self._finalized:
            return
        MCoreDDPConfig.__post_init__(self)
        self._finalized = True
