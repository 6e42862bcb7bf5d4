"""Errors that the user's inputs cause, for callers that report them as one line (``bridge_train.user_errors_exit``,
the CLIs) rather than as a traceback."""

__all__ = ["CheckpointMismatchError"]


class CheckpointMismatchError(ValueError):
    """The weights of a checkpoint (HF or Megatron) do not fit the model they are loaded into: tensors missing or
    unexpected, or shapes that differ (a checkpoint of another model, or model settings changed after choosing it).
    """
