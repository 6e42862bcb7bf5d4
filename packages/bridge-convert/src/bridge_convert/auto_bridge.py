"""AutoBridge: the user-facing entry point for HF <-> Megatron conversion."""

from __future__ import annotations

import difflib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import model_bridge as engine
from .finite import NonFinite
from .hf_config import dtype_from_hf, dtype_to_hf, fill_token_ids_from_tokenizer, load_hf_config, parse_dtype
from .megatron_ckpt import (
    HF_ASSET_FILES,
    HF_ASSETS_DIR,
    load_model_state,
    read_checkpoint_metadata,
    resolve_checkpoint_dir,
    save_checkpoint,
)
from .outputs import CONVERTED_MARKER, OutputError, check_output_dir, staged_output_dir
from .registry import bridge_for_config, get_bridge, supported_architectures
from .runtime import get_parallel_state, log_rank0
from .safetensors_io import (
    DEFAULT_MAX_SHARD_SIZE,
    LazyHFCheckpoint,
    ShardedSafetensorsWriter,
    SourceLayout,
    parse_size,
    sized_plan,
)

if TYPE_CHECKING:
    from .provider import GPTModelProvider

__all__ = ["AutoBridge"]


def _provider_class() -> type[GPTModelProvider]:
    """GPTModelProvider, imported on first use: it imports megatron-core, which offline conversion never needs."""
    from .provider import GPTModelProvider

    return GPTModelProvider


def _resolve_hf_path(path: str | os.PathLike) -> Path:
    local = Path(path)
    if local.is_dir():
        return local
    text = str(path)
    if local.exists() or text.count("/") != 1 or text.startswith((".", "/")):
        raise FileNotFoundError(f"HF model directory not found: {path}")
    try:  # a hub id such as "meta-llama/Llama-3.2-1B"
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                            "*.jinja"]))
    except Exception as exc:
        raise FileNotFoundError(f"{path!r} is not a local directory and could not be fetched from the HF hub "
                                f"({type(exc).__name__}: {exc}); pass a local model directory") from exc


def _apply_overrides(provider: GPTModelProvider, overrides: dict[str, Any]) -> None:
    fields = set(provider.__dataclass_fields__)
    for key, value in overrides.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"GPTModelProvider has no field {key!r}{hint}")
        setattr(provider, key, parse_dtype(value) if key in ("params_dtype", "pipeline_dtype") else value)


def record_tensor_dtype(config: dict[str, Any], dtypes: dict[str, torch.dtype]) -> None:
    """Set the config's ``dtype`` (or legacy ``torch_dtype``) to the dtype the written floating tensors have.

    Left alone when they have several (a source checkpoint with mixed dtypes, reproduced as it was).
    """
    floating = {d for d in dtypes.values() if d.is_floating_point}
    if len(floating) != 1:
        return
    key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[key] = dtype_to_hf(floating.pop())


class AutoBridge:
    """Convert between an HF causal LM (config + weights) and megatron-core GPT models.

    ```python
    bridge = AutoBridge.from_hf_pretrained("/models/Llama-3.2-1B")
    model = bridge.to_megatron_model(load_weights=True, wrap_with_ddp=False, tensor_model_parallel_size=2)
    bridge.save_hf_pretrained(model, "/out/llama-hf")
    ```
    """

    def __init__(self, hf_config: dict[str, Any], hf_path: str | os.PathLike | None = None) -> None:
        self.model_bridge = bridge_for_config(hf_config)
        self.hf_config = dict(hf_config)
        self.hf_config.setdefault("architectures", [self.model_bridge.hf_architecture])  # exports name it
        self.hf_path = Path(hf_path) if hf_path is not None else None
        self._source_layout: SourceLayout | None = None

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def from_hf_pretrained(cls, path: str | os.PathLike) -> AutoBridge:
        """A bridge for the HF model at ``path`` (a local directory, or a hub id when the hub is reachable)."""
        local = _resolve_hf_path(path)
        return cls(load_hf_config(local), local)

    @classmethod
    def from_hf_config(cls, config) -> AutoBridge:
        """A bridge from a config alone (a dict or a transformers ``PretrainedConfig``); no weights to load."""
        raw = config if isinstance(config, dict) else config.to_dict()
        return cls(raw)

    @classmethod
    def for_provider(cls, provider: GPTModelProvider) -> AutoBridge:
        """The bridge of a provider: the one that made it (with its HF source), else one built from
        ``provider.hf_architecture`` and the provider's own fields.

        Raises:
            ValueError: if the provider names no HF architecture.
        """
        bridge = getattr(provider, "_hf_bridge", None)
        if bridge is not None:
            return bridge
        if not provider.hf_architecture:
            raise ValueError("the model provider has no hf_architecture (e.g. 'LlamaForCausalLM'); set it to save "
                             "or export HF checkpoints of this model")
        return cls(get_bridge(provider.hf_architecture).provider_to_config(provider, None))

    @classmethod
    def list_supported_models(cls) -> list[str]:
        """HF architecture names this package converts."""
        return supported_architectures()

    @classmethod
    def supports(cls, config) -> bool:
        raw = config if isinstance(config, dict) else config.to_dict()
        try:
            bridge_for_config(raw)
        except ValueError:
            return False
        return True

    def to_megatron_provider(self, load_weights: bool = True) -> GPTModelProvider:
        """A ``GPTModelProvider`` for this model; with ``load_weights`` its models come with the HF weights."""
        provider = _provider_class()(**self.model_bridge.config_to_provider(self.hf_config),
                                    hf_architecture=self.model_bridge.hf_architecture)
        provider._hf_bridge = self  # runtime link (not a config field) so trainers can export with the source assets
        if self.hf_path is not None and (self.hf_path / "generation_config.json").exists():
            provider.generation_config = json.loads((self.hf_path / "generation_config.json").read_text())
        if load_weights:
            if self.hf_path is None:
                raise ValueError("this bridge was made from a config alone; there are no weights to load")
            provider.perform_initialization = False  # every weight is overwritten by the load (names are checked)
            provider.register_pre_wrap_hook(lambda chunks: self.load_hf_weights(chunks) or chunks)
        return provider

    def to_megatron_model(self, load_weights: bool = True, wrap_with_ddp: bool = False,
                          **provider_overrides: Any) -> list:
        """Build the model on this rank (its TP/PP slice), optionally with the HF weights.

        ``provider_overrides`` are GPTModelProvider fields (``tensor_model_parallel_size=2``,
        ``params_dtype=torch.float32``, ``transformer_impl="local"``, ...).
        """
        provider = self.to_megatron_provider(load_weights=load_weights)
        _apply_overrides(provider, provider_overrides)
        return provider.provide_distributed_model(wrap_with_ddp=wrap_with_ddp)

    # ----------------------------------------------------------------------------------------- I/O
    @staticmethod
    def _provider_of(model: list) -> GPTModelProvider:
        from megatron.core.utils import unwrap_model

        config = unwrap_model(model[0]).config
        if not isinstance(config, _provider_class()):
            raise TypeError(f"model config is a {type(config).__name__}, not a GPTModelProvider; build the model "
                            "with AutoBridge.to_megatron_model or a GPTModelProvider")
        return config

    def load_hf_weights(self, model: list, hf_path: str | os.PathLike | None = None) -> None:
        """Copy HF weights (default: this bridge's checkpoint) into an already built model, on every rank."""
        path = Path(hf_path) if hf_path is not None else self.hf_path
        if path is None:
            raise ValueError("no HF checkpoint to load: pass hf_path")
        reader = LazyHFCheckpoint(path)
        try:
            engine.load_hf_weights(self.model_bridge, self._provider_of(model), model, reader, get_parallel_state(),
                                   progress=True)
        finally:
            reader.close()

    def export_hf_weights(self, model: list, cpu: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream ``(hf_name, full tensor)`` for the whole model. Every rank must consume the whole stream."""
        return engine.export_hf_weights(self.model_bridge, self._provider_of(model), model, get_parallel_state(),
                                        cpu=cpu)

    def hf_config_for(self, model_or_provider) -> dict[str, Any]:
        """The HF config dict that describes ``model_or_provider``, keeping this bridge's source config keys."""
        provider = model_or_provider if isinstance(model_or_provider, _provider_class()) else \
            self._provider_of(model_or_provider)
        return self.model_bridge.provider_to_config(provider, self.hf_config)

    def save_hf_pretrained(self, model: list, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                           max_shard_size: int | str | None = None, overwrite: bool = False,
                           assets_from: str | os.PathLike | None = None) -> None:
        """Write the model as an HF checkpoint: config, generation config, tokenizer files, safetensors shards.

        When this bridge knows the source HF checkpoint's layout (it was made from that checkpoint, or from a
        Megatron checkpoint imported from it) and the tensor names and shapes match, every tensor returns to its
        source file, offset and dtype, and the index is copied: unchanged weights give byte-identical files.
        Otherwise, or when ``dtype`` is given, files are cut at ``max_shard_size`` (default 5GB) in ``dtype``
        (default: the model's params dtype). A ``max_shard_size`` given cuts the files at it even when the source
        layout matches (the tensors keep the source dtypes then). Tensors are written to their final place as
        they stream in, so memory holds one tensor at a time. All ranks call this; rank 0 writes. The directory appears only when complete: a failure
        leaves no partial output behind. A non-empty ``path`` is refused unless ``overwrite`` (see
        :mod:`bridge_convert.outputs` for what is never overwritten). ``assets_from``: a directory whose tokenizer
        and generation config files are written instead of the source checkpoint's (e.g. the ``hf_assets`` of
        the checkpoint a fine-tune wrote, which hold the tokenizer it trained with).
        """
        if max_shard_size is not None:
            parse_size(max_shard_size)  # a bad size is refused before anything is gathered
        inputs = [self.hf_path] if self.hf_path is not None else []
        check_output_dir(path, overwrite=overwrite, inputs=inputs)
        state = get_parallel_state()
        provider = self._provider_of(model)
        config = self.hf_config_for(provider)
        shapes = engine.export_hf_shapes(self.model_bridge, provider, model, state)
        layout, aliases = self._matching_source_layout(provider, shapes) if dtype is None else (None, {})
        target_dtype = parse_dtype(dtype) if dtype is not None else provider.params_dtype
        stream = self.export_hf_weights(model)
        if state.rank != 0:
            for _ in stream:
                pass
            _rank0_outcome(f"saving {path}")
            return
        from tqdm.auto import tqdm

        try:
            with staged_output_dir(path, overwrite=overwrite, inputs=inputs) as tmp:
                dtypes = layout.dtypes if layout is not None else dict.fromkeys((n for n, _ in shapes), target_dtype)
                if layout is not None and max_shard_size is None:
                    writer = ShardedSafetensorsWriter.from_source(tmp, layout)
                else:
                    writer = ShardedSafetensorsWriter.by_size(tmp, sized_plan(shapes, dtypes, aliases),
                                                              max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)
                non_finite = NonFinite()
                for name, tensor in tqdm(stream, total=len(shapes), desc="Exporting HF weights", unit="tensor"):
                    converted = tensor.to(dtypes[name])
                    non_finite.check(converted, {name: tensor})
                    writer.add(name, converted)
                    for alias in aliases.get(name, ()):
                        writer.add(alias, tensor.to(dtypes[alias]))
                problem = non_finite.problem(f"the model saved to {path}", "export", "dtype='bfloat16' or 'float32'")
                if problem:
                    raise ValueError(problem)
                writer.close()
                if layout is not None:  # tensors keep their source dtypes, and so does the config
                    config.update({k: self.hf_config[k] for k in ("dtype", "torch_dtype") if k in self.hf_config})
                record_tensor_dtype(config, dtypes)
                (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                self._write_assets(tmp, provider, assets_from)
        except Exception as exc:
            _rank0_outcome(f"saving {path}", exc)
            raise
        _rank0_outcome(f"saving {path}")
        log_rank0("saved HF checkpoint to %s", path)

    def source_layout(self) -> SourceLayout | None:
        """Files, byte layout and index of the HF checkpoint this bridge came from (None if unknown)."""
        if self._source_layout is None and self.hf_path is not None:
            self._source_layout = SourceLayout.from_checkpoint(self.hf_path)
        return self._source_layout

    def _matching_source_layout(self, provider: GPTModelProvider, shapes: list[tuple[str, tuple[int, ...]]]
                                ) -> tuple[SourceLayout | None, dict[str, list[str]]]:
        """The source layout (and tied aliases to write) when the export yields exactly its tensors and shapes."""
        layout = self.source_layout()
        if layout is None:
            return None, {}
        source_shapes = {t: e[3] for plan in layout.plans() for t, e in plan.entries.items()}
        exported = dict(shapes)
        aliases: dict[str, list[str]] = {}
        if provider.share_embeddings_and_output_weights:
            for alias, target in self.model_bridge.tied_aliases.items():
                if alias in source_shapes and target in exported:
                    aliases.setdefault(target, []).append(alias)
                    exported[alias] = exported[target]
        if exported != source_shapes:
            log_rank0("the exported tensors differ from the source checkpoint's; sharding by size instead")
            return None, {}
        return layout, aliases

    def _write_assets(self, out: Path, provider: GPTModelProvider, assets_from: str | os.PathLike | None = None
                      ) -> None:
        copied = False
        source = Path(assets_from) if assets_from is not None else self.hf_path
        if source is not None:
            for name in HF_ASSET_FILES:
                src = source / name
                if src.exists():
                    shutil.copy2(src, out / name)
                    copied |= name == "generation_config.json"
        if not copied and provider.generation_config:
            (out / "generation_config.json").write_text(json.dumps(provider.generation_config, indent=2) + "\n")
        fill_token_ids_from_tokenizer(out)

    # ------------------------------------------------------------------------ Megatron checkpoints
    def checkpoint_metadata(self, model: list) -> dict[str, Any]:
        """What a Megatron checkpoint of ``model`` records in ``bridge.json`` so it can be exported to HF later."""
        provider = self._provider_of(model)
        metadata = {
            "architecture": self.model_bridge.hf_architecture,
            "hf_config": self.hf_config_for(provider),
            "params_dtype": dtype_to_hf(provider.params_dtype),
            "saved_layout": {"tensor_model_parallel_size": provider.tensor_model_parallel_size,
                             "pipeline_model_parallel_size": provider.pipeline_model_parallel_size,
                             "virtual_pipeline_model_parallel_size": provider.virtual_pipeline_model_parallel_size},
        }
        layout = self.source_layout()
        if layout is not None:
            metadata["hf_source_layout"] = layout.to_json()
        return metadata

    def save_megatron_checkpoint(self, model: list, path: str | os.PathLike, *, iteration: int = 0,
                                 extra_state: dict[str, Any] | None = None) -> Path:
        """Save ``model`` in the shared Megatron checkpoint format (see :mod:`bridge_convert.megatron_ckpt`)."""
        return save_checkpoint(model, path, iteration=iteration, metadata=self.checkpoint_metadata(model),
                               extra_state=extra_state, hf_assets_from=self.hf_path)

    @classmethod
    def from_megatron_checkpoint(cls, path: str | os.PathLike) -> AutoBridge:
        """A bridge for the model stored in a Megatron checkpoint (its HF config and assets)."""
        directory = resolve_checkpoint_dir(path)
        meta = read_checkpoint_metadata(directory)
        assets = directory / HF_ASSETS_DIR
        bridge = cls(meta["hf_config"], assets if assets.is_dir() else None)
        if "hf_source_layout" in meta:
            bridge._source_layout = SourceLayout.from_json(meta["hf_source_layout"])
        return bridge

    def load_megatron_checkpoint(self, model: list, path: str | os.PathLike) -> None:
        """Load a Megatron checkpoint's weights into ``model``, whatever layout it was saved with (before its
        optimizer is made: Transformer Engine FP8 parameters hand their loaded values to it, as with HF weights)."""
        load_model_state(model, path, fresh_model=True)

    @classmethod
    def import_ckpt(cls, hf_path: str | os.PathLike, megatron_path: str | os.PathLike, *, overwrite: bool = False,
                    dtype: torch.dtype | str | None = None, offline: bool | None = None, threads: int | None = None,
                    **provider_overrides: Any) -> Path:
        """HF checkpoint -> Megatron checkpoint, written whole or not at all.

        By default (``offline``) the tensors go straight from the safetensors files into megatron-core's
        torch_dist format (:mod:`bridge_convert.offline`): no model is built, megatron-core is not imported, memory
        holds one layer slice at a time, and the result loads at any TP / PP / VP layout. With
        ``provider_overrides`` (e.g. ``tensor_model_parallel_size=2``) or ``offline=False`` the model is built
        at that layout (every rank calls this) and saved by megatron-core.

        Args:
            dtype: parameter dtype (default: the HF config's; a warning says so when that rounds the stored
                weights, e.g. float32 weights under a config saying bfloat16); same as ``params_dtype=``.
            overwrite: replace a non-empty ``megatron_path`` (never an input or a training checkpoint).
            threads: writer threads of the offline converter (default 1); refused with the model-building path.

        Returns:
            The iteration directory.
        """
        if "params_dtype" in provider_overrides:
            if dtype is not None:
                raise ValueError("pass dtype or params_dtype, not both")
            dtype = provider_overrides.pop("params_dtype")
        offline = not provider_overrides if offline is None else offline
        _threads_only_offline(offline, threads)
        if offline:
            if provider_overrides:
                raise ValueError(f"offline import takes no model overrides ({sorted(provider_overrides)}): its "
                                 "checkpoint loads at any layout; pass offline=False to build the model with them")
            from .offline import import_hf_checkpoint

            return _on_rank0(lambda: import_hf_checkpoint(hf_path, megatron_path, dtype=dtype, overwrite=overwrite,
                                                          threads=threads or 1))
        bridge = cls.from_hf_pretrained(hf_path)
        check_output_dir(megatron_path, overwrite=overwrite, inputs=[hf_path])
        if dtype is not None:
            provider_overrides["params_dtype"] = dtype
        elif int(os.environ.get("RANK", "0")) == 0:  # the runtime starts with the model: ask the launcher
            from .offline.importer import warn_if_rounded
            from .safetensors_io import LazyHFCheckpoint

            warn_if_rounded(LazyHFCheckpoint(hf_path).float_dtypes(bridge.model_bridge.is_ignored),
                            dtype_from_hf(bridge.hf_config))
        model = bridge.to_megatron_model(load_weights=True, wrap_with_ddp=False, **provider_overrides)
        metadata = {**bridge.checkpoint_metadata(model), CONVERTED_MARKER: "bridge-convert import"}
        with _staged_on_every_rank(megatron_path, overwrite=overwrite, inputs=[hf_path]) as tmp:
            directory = save_checkpoint(model, tmp, iteration=0, metadata=metadata, hf_assets_from=bridge.hf_path)
        return Path(megatron_path) / directory.name

    @classmethod
    def export_ckpt(cls, megatron_path: str | os.PathLike, hf_path: str | os.PathLike, *,
                    dtype: torch.dtype | str | None = None, overwrite: bool = False,
                    max_shard_size: int | str | None = None, offline: bool | None = None, threads: int | None = None,
                    **provider_overrides: Any) -> None:
        """Megatron checkpoint -> HF checkpoint, written whole or not at all.

        By default (``offline``) the checkpoint's tensors are read slice by slice and written through the
        shard-preserving safetensors writer, without building the model. With ``provider_overrides`` (a layout to
        load at, e.g. ``tensor_model_parallel_size=2``) or ``offline=False`` the model is built, loaded and saved
        with :meth:`save_hf_pretrained`. Both give the same files.

        Args:
            dtype: HF tensor dtype (default: the source HF layout's dtypes, else the checkpoint's).
            overwrite: replace a non-empty ``hf_path`` (never an input or a training checkpoint).
            max_shard_size: largest safetensors file; given, the files are cut at it even where the source layout
                would be reproduced (default: the source's files, else 5GB).
            threads: tensors the offline converter reads ahead in parallel (default 2); refused with the
                model-building path.
        """
        offline = not provider_overrides if offline is None else offline
        _threads_only_offline(offline, threads)
        if max_shard_size is not None:
            parse_size(max_shard_size)  # before the model is built
        if offline:
            if provider_overrides:
                raise ValueError(f"offline export takes no model overrides ({sorted(provider_overrides)}); pass "
                                 "offline=False to build the model with them")
            from .offline import export_megatron_checkpoint

            _on_rank0(lambda: export_megatron_checkpoint(megatron_path, hf_path, dtype=dtype,
                                                         max_shard_size=max_shard_size, overwrite=overwrite,
                                                         threads=threads or 2))
            return
        bridge = cls.from_megatron_checkpoint(megatron_path)
        check_output_dir(hf_path, overwrite=overwrite, inputs=[megatron_path])
        meta = read_checkpoint_metadata(megatron_path)
        overrides = {"params_dtype": meta.get("params_dtype", "float32"), "perform_initialization": False,
                     **provider_overrides}
        model = bridge.to_megatron_model(load_weights=False, wrap_with_ddp=False, **overrides)
        bridge.load_megatron_checkpoint(model, megatron_path)
        bridge.save_hf_pretrained(model, hf_path, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)


def _rank0_outcome(what: str, error: Exception | None = None) -> None:
    """Rank 0 tells the other ranks whether ``what`` succeeded there; they raise when it did not (rather than wait
    in a barrier rank 0 never reaches). Every rank calls it once; a no-op in a single process."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    box = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(box, src=0)
    if dist.get_rank() != 0 and box[0] is not None:
        raise ValueError(f"{what} failed on rank 0: {box[0]}")


def _threads_only_offline(offline: bool, threads: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if threads is not None and not offline:
        raise ValueError("threads sets the offline converter's readers / writers; the model-building path (model "
                         "overrides or offline=False) has none: drop threads")


def _on_rank0(convert):
    """Run an offline conversion once: on rank 0 when called from every rank of a job (the others wait and share
    its outcome, so all ranks return or raise together)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return convert()
    outcome: list = [None]
    if dist.get_rank() == 0:
        try:
            result = convert()
            outcome = [("ok", result)]
        except Exception as exc:
            outcome = [("error", f"{type(exc).__name__}: {exc}")]
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise ValueError(f"the conversion failed on rank 0: {value}")
    return value


@contextmanager
def _staged_on_every_rank(out: str | os.PathLike, *, overwrite: bool, inputs: list) -> Iterator[Path]:
    """:func:`staged_output_dir` on rank 0, its temporary path shared with every rank (for collective saves)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        with staged_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
            yield tmp
        return
    if dist.get_rank() != 0:
        box: list = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            raise OutputError(f"rank 0 could not prepare the output {out}")
        yield Path(box[0])
        dist.barrier()
        return
    stack = ExitStack()
    try:
        tmp = stack.enter_context(staged_output_dir(out, overwrite=overwrite, inputs=inputs))
    except BaseException:
        dist.broadcast_object_list([None], src=0)
        raise
    with stack:
        dist.broadcast_object_list([str(tmp)], src=0)
        yield tmp
        dist.barrier()
