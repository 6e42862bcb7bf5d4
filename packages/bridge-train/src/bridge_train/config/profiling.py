"""Optional profiling: a torch.profiler trace over a step range and a CUDA memory snapshot."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ProfilingConfig"]


@dataclass(kw_only=True, slots=True)
class ProfilingConfig:
    """torch.profiler over iterations [profile_step_start, profile_step_end) on some ranks; memory history."""

    use_pytorch_profiler: bool = False
    """Record a torch.profiler trace (TensorBoard / Chrome trace format)."""
    profile_step_start: int = 10
    """First profiled iteration (iterations count from 1)."""
    profile_step_end: int = 12
    """Iteration at which profiling stops (exclusive; past the last iteration: at the end of the run)."""
    profile_ranks: tuple[int, ...] = (0,)
    """Global ranks that profile."""
    record_shapes: bool = False
    """Record operator input shapes in the trace."""
    profile_dir: str | None = None
    """Where traces go; None: logger.tensorboard_dir."""
    record_memory_history: bool = False
    """Record CUDA allocator history and dump a snapshot to memory_snapshot_path at profile_step_end."""
    memory_snapshot_path: str | None = None
    """File for the memory snapshot (pickle, for pytorch.org/memory_viz)."""

    def check(self, prefix: str = "profiling") -> list[str]:
        """Problems with this config alone (the trace directory fallback is the container's)."""
        problems = [f"{prefix}.{name} is set but {prefix}.{switch} is false; set {prefix}.{switch}=true, or "
                    f"{prefix}.{name}={'false' if name == 'record_shapes' else 'null'}"
                    for switch, names in (("use_pytorch_profiler", ("record_shapes", "profile_dir")),
                                          ("record_memory_history", ("memory_snapshot_path",)))
                    for name in names if getattr(self, name) and not getattr(self, switch)]
        if not (self.use_pytorch_profiler or self.record_memory_history):
            return problems
        if self.profile_step_start < 1 or self.profile_step_end <= self.profile_step_start:  # iterations from 1
            problems.append(f"{prefix}.profile_step_start ({self.profile_step_start}) must be >= 1 and < "
                            f"{prefix}.profile_step_end ({self.profile_step_end})")
        if not self.profile_ranks or any(r < 0 for r in self.profile_ranks):
            problems.append(f"{prefix}.profile_ranks must list ranks >= 0, got {list(self.profile_ranks)}")
        if self.record_memory_history and not self.memory_snapshot_path:
            problems.append(f"{prefix}.record_memory_history needs {prefix}.memory_snapshot_path (a file path)")
        return problems
