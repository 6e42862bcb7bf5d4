"""Offline HF <-> Megatron conversion: tensor by tensor between safetensors files and megatron-core's torch_dist
checkpoint format, through the bridges' mapping tables, without building the model, a process group or importing
megatron-core. The result loads into megatron-core at any TP / PP / VP layout (it reshards on load)."""

from .exporter import export_megatron_checkpoint
from .importer import import_hf_checkpoint

__all__ = ["export_megatron_checkpoint", "import_hf_checkpoint"]
