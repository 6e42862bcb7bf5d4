"""GPTModelProvider: a megatron-core TransformerConfig that also knows how to build (and place) a GPT model.

Two phases, as megatron-core configs are used in practice: build and edit the provider freely (fields such as
``tensor_model_parallel_size`` may be overridden after the bridge made it), then :meth:`finalize` once, which
runs TransformerConfig's own validation and derives the fields that depend on the machine (CPU or GPU) and the
parallel layout. :meth:`provide_distributed_model` finalizes, initialises the parallel runtime and returns one
model per virtual-pipeline stage, as megatron-core's schedules expect.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from .mappings import DEFAULT_VOCAB_DIVISOR, padded_vocab_size
from .runtime import ParallelLayout, initialize_parallel
from .specs import TRANSFORMER_IMPLS, layer_spec, resolve_transformer_impl, te_available

__all__ = ["GPTModelProvider", "padded_vocab_size"]

logger = logging.getLogger(__name__)

TransformerImpl = Literal["auto", "native", "local", "transformer_engine"]


# Fusions that need CUDA kernels (apex / TE / jit-fused CUDA code); off when the model is built on a CPU.
_CUDA_ONLY_FUSIONS = (
    "bias_activation_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "apply_rope_fusion",
    "bias_dropout_fusion",
    "cross_entropy_loss_fusion",
)


def _activation_fusable(config) -> bool:
    """Whether megatron-core's ``bias_activation_fusion`` has a kernel for this MLP (its own validation rules)."""
    from megatron.core.fusions.fused_bias_geglu import quick_gelu

    if config.use_te_activation_func or (config.glu_linear_offset and config.activation_func is not quick_gelu):
        return False
    if config.activation_func is F.silu:
        return True
    if config.activation_func is F.gelu:
        return config.gated_linear_unit or config.add_bias_linear
    return config.activation_func is quick_gelu and config.gated_linear_unit


@dataclass(kw_only=True)
class GPTModelProvider(TransformerConfig):
    """megatron-core ``TransformerConfig`` fields plus what ``GPTModel`` needs to be built.

    Every TransformerConfig field is a field here (``num_layers``, ``hidden_size``, ``tensor_model_parallel_size``,
    ``bf16``, ...). The defaults of the required ones are placeholders that a bridge or a recipe overwrites.
    """

    num_layers: int = 1
    hidden_size: int = 64
    num_attention_heads: int = 1

    vocab_size: int | None = None
    """Vocabulary size of the tokenizer / HF checkpoint (unpadded)."""
    seq_length: int = 4096
    """Maximum sequence length (the model's ``max_sequence_length``)."""
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR
    """The embedding and output layer are padded to a multiple of this times TP."""
    share_embeddings_and_output_weights: bool = False
    """Tied input embedding and output layer (Llama 3.2 1B/3B)."""
    position_embedding_type: Literal["rope", "learned_absolute", "none"] = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rope_scaling: bool = False
    """Llama 3.1-style frequency scaling of RoPE."""
    rope_scaling_factor: float = 8.0
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_original_max_position_embeddings: int = 8192
    seq_len_interpolation_factor: float | None = None
    """Linear RoPE position interpolation (HF ``rope_type="linear"``)."""
    parallel_output: bool = True
    """Keep logits vocab-sharded under TP (the loss handles it); False gathers full logits."""
    fp16_lm_cross_entropy: bool = False
    transformer_impl: TransformerImpl = "auto"
    """Layer spec: ``native`` (torch-native fast kernels), ``local`` (megatron-core's reference modules) or
    ``transformer_engine``. ``auto`` picks Transformer Engine when it imports and a GPU is present, else native."""
    compile_layers: bool = False
    """``torch.compile`` each transformer layer (native spec only: refused by :meth:`finalize` for the others)."""
    generation_config: dict[str, Any] | None = field(default=None, repr=False)
    """HF generation settings carried along so an export writes them back."""
    hf_architecture: str | None = None
    """The HF architecture this model converts to (``LlamaForCausalLM``, ...); set by AutoBridge and recipes, it
    lets checkpoints of this model be exported to HF."""

    # TransformerConfig field defaults that differ for decoder-only LLMs built here.
    normalization: str = "RMSNorm"
    gated_linear_unit: bool = True
    activation_func: Callable = F.silu
    add_bias_linear: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Fused kernels on a GPU (finalize() turns them off on a CPU).
    bias_activation_fusion: bool = True
    bias_dropout_fusion: bool = True
    recompute_activation_output: bool = False
    """Native spec: do not keep the SwiGLU output for fc2's backward; recompute it from fc1's output (kept anyway)
    just before. Saves ``ffn_hidden_size / TP`` activations per token and layer (8.6 GB for Llama-3.2-1B at
    micro-batch 8, seq 4096, bf16) for one extra SwiGLU forward per layer."""
    apply_rope_fusion: bool | None = None
    """megatron-core's fused RoPE (Transformer Engine's kernel) in the ``local`` and ``transformer_engine`` specs.
    ``None`` (auto): on when the model is built on a GPU and Transformer Engine imports; the native spec applies
    its own fused RoPE and keeps this off."""
    cross_entropy_loss_fusion: bool | None = None
    """A fused vocab-parallel cross entropy for the ``local`` and ``transformer_engine`` specs (the native spec's
    chunked linear + cross entropy ignores it). ``None`` (auto): on for those specs on a GPU."""
    cross_entropy_fusion_impl: Literal["native", "te"] | None = None
    """Which fused cross entropy: ``te`` (Transformer Engine's kernel) or ``native`` (megatron-core's). ``None``
    (auto): ``te`` when Transformer Engine imports, else ``native``."""
    overlap_p2p_comm: bool | None = None
    """Pipeline send/receive as separate, overlapped operations (megatron-core's ``_p2p_ops``). ``None`` (auto): on
    with a virtual pipeline, as Megatron-LM defaults it for the interleaved schedule, off otherwise."""
    batch_p2p_comm: bool | None = None
    """Pipeline send/receive as one ``batch_isend_irecv``. ``None`` (auto): the opposite of ``overlap_p2p_comm``.
    Refused with a virtual pipeline over 2 stages: both neighbours are the same rank there, the batch then pairs a
    gradient sent with an activation received (the losses went wrong from the second micro-batch group, measured
    against one process)."""
    gradient_accumulation_fusion: bool | None = None
    """Weight-gradient GEMMs accumulate straight into DDP's fp32 ``main_grad`` (apex's kernel, else torch's:
    ``native/wgrad.py``). It needs megatron DDP's ``main_grad``: ``None`` (auto) turns it on where
    ``provide_distributed_model`` wraps the model in DDP on a GPU, off otherwise."""

    def __post_init__(self) -> None:
        # TransformerConfig's validation and derived fields run in finalize(), after the user's edits (e.g. a new
        # tensor_model_parallel_size) are in.
        self._finalized = False
        self._pre_wrap_hooks: list[Callable[[list], list]] = []

    def register_pre_wrap_hook(self, hook: Callable[[list], list | None]) -> None:
        """Run ``hook(model_chunks)`` in provide_distributed_model after building, before Float16/DDP wrapping
        (loading weights, applying PEFT); it may return replacement chunks."""
        self._pre_wrap_hooks.append(hook)

    # ----------------------------------------------------------------------------------------- phases
    def finalize(self) -> GPTModelProvider:
        """Validate and derive fields once; idempotent. Called by ``provide*``; call it yourself to check early.

        Raises:
            ValueError: for settings that cannot build (heads or KV groups not divisible by TP, layers not
                divisible by the pipeline, unknown transformer_impl, missing vocab size, ...).
        """
        if self._finalized:
            return self
        self._raise_if_invalid()
        self.transformer_impl = resolve_transformer_impl(self.transformer_impl)
        for feature in ("recompute_activation_output", "compile_layers"):
            if getattr(self, feature) and self.transformer_impl != "native":
                raise ValueError(f"{feature} is a feature of the native spec; transformer_impl resolved to "
                                 f"{self.transformer_impl!r} (set transformer_impl='native' or drop {feature})")
        on_gpu = torch.cuda.is_available()
        self._resolve_fused_kernels(on_gpu=on_gpu, te=te_available())
        if not on_gpu:
            self.use_cpu_initialization = True
            for name in _CUDA_ONLY_FUSIONS:
                if getattr(self, name, False):
                    setattr(self, name, False)
        if self.bias_activation_fusion and not _activation_fusable(self):
            # On by default for SwiGLU / GeGLU; megatron-core has no fused kernel for this activation setup.
            self.bias_activation_fusion = False
        if self.params_dtype == torch.bfloat16:
            self.bf16 = True
        elif self.params_dtype == torch.float16:
            self.fp16 = True
        if self.pipeline_dtype is None:
            self.pipeline_dtype = self.params_dtype
        if self.pipeline_model_parallel_size == 1 and self.virtual_pipeline_model_parallel_size == 1:
            self.virtual_pipeline_model_parallel_size = None
        self._resolve_p2p()
        TransformerConfig.__post_init__(self)
        self._finalized = True
        return self

    def _resolve_p2p(self) -> None:
        """Resolve the ``None`` (auto) pipeline-communication modes; refuse batched p2p where it mismatches."""
        interleaved = (self.virtual_pipeline_model_parallel_size or 1) > 1
        if self.overlap_p2p_comm is None:
            self.overlap_p2p_comm = interleaved and not self.batch_p2p_comm
        if self.batch_p2p_comm is None:
            self.batch_p2p_comm = not self.overlap_p2p_comm
        if self.batch_p2p_comm and interleaved and self.pipeline_model_parallel_size == 2:
            raise ValueError("batch_p2p_comm=True with a virtual pipeline over pipeline_model_parallel_size=2 pairs "
                             "a gradient sent with an activation received (both neighbours are the same rank) and "
                             "trains on wrong activations; set batch_p2p_comm=None (auto) or False")

    def _resolve_fused_kernels(self, *, on_gpu: bool, te: bool) -> None:
        """Resolve the ``None`` (auto) fusions for the resolved spec; refuse an explicit one that cannot run.

        The TE spec without fused RoPE and cross entropy ran 16% slower than megatron-core with them on one H200
        (the unfused loss materialises fp32 logits: 17 GB at micro-batch 8, seq 4096, vocab 128256).
        """
        megatron_modules = self.transformer_impl != "native"
        if self.apply_rope_fusion is None:
            self.apply_rope_fusion = megatron_modules and on_gpu and te
        elif self.apply_rope_fusion and not te and on_gpu:
            raise ValueError("apply_rope_fusion=True needs Transformer Engine's fused RoPE kernel, which does not "
                             "import here; set apply_rope_fusion=None (auto) or False, or install the te extra")
        if self.cross_entropy_loss_fusion is None:
            self.cross_entropy_loss_fusion = megatron_modules and on_gpu
        if self.cross_entropy_fusion_impl is None:
            self.cross_entropy_fusion_impl = "te" if te else "native"
        elif self.cross_entropy_fusion_impl == "te" and not te and on_gpu and self.cross_entropy_loss_fusion:
            raise ValueError("cross_entropy_fusion_impl='te' needs Transformer Engine, which does not import here; "
                             "set it to 'native' or None (auto)")

    def _resolve_gradient_accumulation_fusion(self, auto: bool) -> None:
        """``None`` -> ``auto``; when on, make sure megatron-core has a wgrad-accumulation kernel to call."""
        if self.gradient_accumulation_fusion is None:
            self.gradient_accumulation_fusion = auto
        if self.gradient_accumulation_fusion:
            # megatron-core wants apex's fused wgrad GEMM for this; without apex, torch's (native/wgrad.py).
            from .native.wgrad import install_torch_wgrad_accumulation

            install_torch_wgrad_accumulation()

    def _check(self) -> list[str]:
        problems = []
        if self.vocab_size is None or self.vocab_size <= 0:
            problems.append(f"vocab_size must be a positive integer, got {self.vocab_size!r}")
        tp = self.tensor_model_parallel_size
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
                            f"tensor_model_parallel_size ({tp}); choose a TP that divides it")
        if groups % tp:
            problems.append(f"num_query_groups ({groups}) is not divisible by tensor_model_parallel_size ({tp}); "
                            "each TP rank must hold whole KV groups")
        stages = self.pipeline_model_parallel_size * (self.virtual_pipeline_model_parallel_size or 1)
        if self.num_layers % stages and self.pipeline_model_parallel_layout is None:
            problems.append(f"num_layers ({self.num_layers}) is not divisible by pipeline_model_parallel_size x "
                            f"virtual_pipeline_model_parallel_size ({stages})")
        if self.pipeline_model_parallel_layout is not None:
            problems += self._layout_problems()
        if self.virtual_pipeline_model_parallel_size and self.pipeline_model_parallel_size == 1 \
                and self.virtual_pipeline_model_parallel_size > 1:
            problems.append("virtual_pipeline_model_parallel_size > 1 needs pipeline_model_parallel_size > 1")
        if self.gradient_accumulation_fusion and getattr(self, "defer_embedding_wgrad_compute", False) \
                and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is None:
            problems.append("defer_embedding_wgrad_compute needs apex's fused_weight_gradient_mlp_cuda extension "
                            "(not installed); set defer_embedding_wgrad_compute=False")
        discarding = {"layernorm", "moe_act", "mla_up_proj", "gdn_norm_out"} & set(self.recompute_modules or ())
        try:
            native = resolve_transformer_impl(self.transformer_impl) == "native"
        except ValueError:
            native = False
        discarding = sorted(discarding - {"layernorm"} if native else discarding)  # the native layer does its own
        if self.recompute_granularity == "selective" and discarding and not te_available():
            # megatron-core 0.19's CheckpointWithoutOutput() sets fp8 = (False is not None) and then calls TE's
            # FP8GlobalStateManager: a NameError in the first forward without Transformer Engine.
            problems.append(f"recompute_modules {discarding} use megatron-core's output-discarding checkpoint, "
                            "which needs Transformer Engine (not importable here); drop them or install the te extra")
        if self.transformer_impl not in ("auto", *TRANSFORMER_IMPLS):
            problems.append(f"transformer_impl must be one of {['auto', *TRANSFORMER_IMPLS]}, "
                            f"got {self.transformer_impl!r}")
        return problems

    def _layout_problems(self) -> list[str]:
        """A custom pipeline layout checked with megatron-core's own parser, in words (megatron-core asserts, e.g.
        ``Number of decoder layers 126must match num_layers 2``, after logging the layout from every rank)."""
        from megatron.core.transformer.enums import LayerType
        from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

        layout, pp, vp = self.pipeline_model_parallel_layout, self.pipeline_model_parallel_size, \
            self.virtual_pipeline_model_parallel_size
        what = f"pipeline_model_parallel_layout {str(layout)!r}"
        fix = ("; set pipeline_model_parallel_layout to None (null) to split the layers evenly, or write a layout "
               "that fits")
        try:
            parsed = PipelineParallelLayerLayout(layout.input_data if isinstance(layout, PipelineParallelLayerLayout)
                                                 else layout, pp)
        except (AssertionError, ValueError, TypeError, KeyError) as err:
            return [f"{what} does not fit pipeline_model_parallel_size {pp}: {err}{fix}"]
        decoders = parsed.flatten_layout.count(LayerType.decoder)
        if decoders != self.num_layers:
            return [f"{what} places {decoders} decoder layers but num_layers is {self.num_layers}{fix}"]
        if vp is not None and vp != parsed.virtual_pipeline_model_parallel_size:
            return [f"{what} has {parsed.virtual_pipeline_model_parallel_size} stage(s) per pipeline rank but "
                    f"virtual_pipeline_model_parallel_size is {vp}{fix}"]
        try:
            parsed.validate_layer_layout(num_layers=self.num_layers, mtp_num_layers=self.mtp_num_layers)
        except (AssertionError, NotImplementedError) as err:
            return [f"{what}: {err}{fix}"]
        return []

    # ------------------------------------------------------------------------------------------ build
    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, self.tensor_model_parallel_size)

    def provide(self, pre_process: bool | None = None, post_process: bool | None = None,
                vp_stage: int | None = None):
        """Build this rank's ``GPTModel`` (its pipeline stage; ``vp_stage`` picks the virtual chunk).

        The parallel runtime must be initialised (``provide_distributed_model`` does it).
        """
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel

        self.finalize()
        self._resolve_gradient_accumulation_fusion(False)
        model_cls = GPTModel
        if self.transformer_impl == "native":
            from .native import NativeGPTModel as model_cls  # same parameters, memory-lean fused loss
        if pre_process is None:
            pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        if post_process is None:
            post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        with _quiet_deprecation():
            model = model_cls(
                config=self,
                transformer_layer_spec=layer_spec(self, vp_stage=vp_stage),
                vocab_size=self.padded_vocab_size,
                max_sequence_length=self.seq_length,
                pre_process=pre_process,
                post_process=post_process,
                fp16_lm_cross_entropy=self.fp16_lm_cross_entropy,
                parallel_output=self.parallel_output,
                share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
                position_embedding_type=self.position_embedding_type,
                rotary_percent=self.rotary_percent,
                rotary_base=self.rotary_base,
                rope_scaling=self.rope_scaling,
                rope_scaling_factor=self.rope_scaling_factor,
                seq_len_interpolation_factor=self.seq_len_interpolation_factor,
                vp_stage=vp_stage,
            )
        self._apply_rope_scaling(model)
        return model

    def _apply_rope_scaling(self, model) -> None:
        """GPTModel passes only the llama3 factor to RoPE; recompute the frequencies with every parameter."""
        rope = getattr(model, "rotary_pos_emb", None)
        defaults = (1.0, 4.0, 8192)
        params = (self.rope_scaling_low_freq_factor, self.rope_scaling_high_freq_factor,
                  self.rope_scaling_original_max_position_embeddings)
        if rope is None or not self.rope_scaling or params == defaults:
            return
        dim = self.kv_channels
        if self.rotary_percent < 1.0:
            dim = int(dim * self.rotary_percent)
        base = 1.0 / (self.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                                         device=rope.inv_freq.device) / dim))
        rope.inv_freq = rope._apply_scaling(base, factor=self.rope_scaling_factor, low_freq_factor=params[0],
                                            high_freq_factor=params[1],
                                            original_max_position_embeddings=params[2])

    def provide_distributed_model(
        self,
        wrap_with_ddp: bool = True,
        ddp_config=None,
        *,
        pre_wrap_hooks: Sequence[Callable[[list], list]] = (),
        overlap_param_gather_with_optimizer_step: bool = False,
        data_parallel_random_init: bool = False,
        seed: int = 1234,
    ) -> list:
        """Initialise the parallel runtime for this provider's layout and build the model on this rank.

        Args:
            wrap_with_ddp: wrap each chunk in megatron-core's ``DistributedDataParallel`` (training).
            ddp_config: a ``DistributedDataParallelConfig``; defaults to megatron-core's defaults.
            pre_wrap_hooks: callables ``hook(model_chunks) -> model_chunks`` run before the DDP wrap
                (loading weights, applying PEFT).
            overlap_param_gather_with_optimizer_step: forwarded to DDP for the distributed optimizer.
            data_parallel_random_init: let DP replicas start from different random weights (else broadcast).
            seed: seed for the parallel RNG tracker when the runtime is initialised here.

        Returns:
            One module per virtual-pipeline stage (a list of length 1 without VP), on the compute device,
            wrapped in ``Float16Module`` for bf16/fp16 and in DDP when requested.
        """
        from megatron.core import tensor_parallel
        from megatron.core.enums import ModelType
        from megatron.core.transformer.module import Float16Module

        self._raise_if_invalid()  # before any process group or weight is allocated
        state = initialize_parallel(ParallelLayout.from_config(self), seed=seed)
        self.finalize()
        self._resolve_gradient_accumulation_fusion(wrap_with_ddp and not state.on_cpu)
        chunks = []
        for vp_stage in range(self.virtual_pipeline_model_parallel_size or 1):
            model = self.provide(vp_stage=vp_stage if self.virtual_pipeline_model_parallel_size else None)
            model.model_type = ModelType.encoder_or_decoder
            chunks.append(model)
        for model in chunks:
            for param in model.parameters():
                tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
            if not state.on_cpu:
                model.cuda(torch.cuda.current_device())
        for hook in (*self._pre_wrap_hooks, *pre_wrap_hooks):
            chunks = hook(chunks) or chunks
        if self.fp16 or self.bf16:
            chunks = [Float16Module(self, m) for m in chunks]
        if wrap_with_ddp:
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

            ddp_config = ddp_config or DistributedDataParallelConfig()
            chunks = [
                DistributedDataParallel(
                    config=self, ddp_config=ddp_config, module=m,
                    disable_bucketing=(i > 0) or overlap_param_gather_with_optimizer_step,
                )
                for i, m in enumerate(chunks)
            ]
            if not data_parallel_random_init:
                for m in chunks:
                    m.broadcast_params()
        return chunks

    def _raise_if_invalid(self) -> None:
        problems = self._check()
        if problems:
            raise ValueError("invalid GPTModelProvider:\n  - " + "\n  - ".join(problems))

    # ------------------------------------------------------------------------------------------ misc
    def replace(self, **changes: Any) -> GPTModelProvider:
        """A copy with ``changes`` applied, not finalized (so derived fields are recomputed)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        values.update(changes)
        return type(self)(**values)


class _quiet_deprecation:
    """megatron-core 0.19 logs "GPTModel IS DEPRECATED" for every build; GPTModel is what this package builds."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "GPTModel IS DEPRECATED" not in record.getMessage()

    _filter = _Filter()

    def __enter__(self):
        logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(self._filter)

    def __exit__(self, *exc):
        logging.getLogger("megatron.core.models.gpt.gpt_model").removeFilter(self._filter)
