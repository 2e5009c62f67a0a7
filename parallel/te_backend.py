"""``parallel.layer_backend=te``: Transformer Engine modules behind the layer-backend seam (``parallel.layers``).

Written against TE's documented PyTorch API (``transformer_engine.pytorch``: ``Linear``, ``LayerNormMLP``,
``DotProductAttention``, ``fp8_autocast``/``autocast`` and the recipes of ``transformer_engine.common.recipe``).
UNMEASURED by us: TE cannot be installed on the machines we test on. ``bench/te_parity.py`` is the check to run
where TE is installed (TE vs torch backend, BF16 and FP8).

What changes and what does not:
- ``column_linear``/``row_linear`` -> ``te.Linear(parallel_mode="column"|"row", tp_group, tp_size,
  sequence_parallel)``. TE names its parameters ``weight`` and ``bias`` with the same local shapes as
  ``ColumnParallelLinear``/``RowParallelLinear`` (row: full bias added after the reduction), so checkpoints move
  between backends. TE's FP8 bookkeeping (``_extra_state``) is left out of state dicts and not required on load.
- TE's sequence parallelism gathers/scatters along the first dimension of the flattened rows (TE is
  sequence-first); our activations are [batch, seq, ...] split over seq, so the wrappers reorder rows around
  TE (a no-op view for one packed row per micro-batch, the usual case).
- ``core_attention`` -> ``te.DotProductAttention`` on the local heads: packed rows in the THD format with
  ``cu_seqlens`` from the segment ids (``mllm.kernels.varlen``), rows without segments in BSHD.
- ``fuse_llm_mlp_te`` (opt-in): post-attention RMSNorm + gate/up + SwiGLU + down as one ``te.LayerNormMLP``,
  with state-dict hooks that keep the torch names (``post_attention_layernorm.weight``,
  ``mlp.{gate,up,down}_proj.weight``) in checkpoints.
- FP8 through TE recipes: ``te_fp8_autocast(FP8Config)`` with ``fp8.recipe`` in delayed | current | mxfp8 |
  blockwise (mxfp8 needs Blackwell).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from mllm.kernels.deps import require
from mllm.kernels.fp8 import FP8Config
from mllm.kernels.padding import pad_linear_rows
from mllm.kernels.varlen import varlen_inputs
from mllm.model.attention import AttentionMask, to_compute_dtype
from parallel.layers import TPInfo

_FEATURE = "parallel.layer_backend=te"


def transformer_engine():
    """``transformer_engine.pytorch``, or a one-line error naming the package and the extra."""
    return require("transformer_engine.pytorch", "transformer-engine", _FEATURE, hint="needs CUDA")


def _module_device() -> str | torch.device:
    # Parallel skeletons are built under torch.device("meta"); TE takes the device as an argument instead
    # (default "cuda"), so pass the ambient one on, and CUDA for the ambient CPU default when there is CUDA.
    default = torch.get_default_device()
    return "cuda" if default.type == "cpu" and torch.cuda.is_available() else default


# -- state dicts: same keys as the torch backend -------------------------------------------------------------
def _drop_extra_state(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith("_extra_state")]:
        del state_dict[key]


def _allow_missing_extra_state(module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    for key in [k for k in missing if k.endswith("_extra_state")]:
        missing.remove(key)


def torch_compatible_state_dict(module: nn.Module) -> nn.Module:
    """Make a TE module's state dict hold only its parameters (no FP8 ``_extra_state``) and load without it."""
    module._register_state_dict_hook(_drop_extra_state)
    module.register_load_state_dict_post_hook(_allow_missing_extra_state)
    return module


# -- sequence-parallel row order ----------------------------------------------------------------------------
def ours_to_te_rows(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    """[b, tp*s, f] (full sequence) -> [tp*b, s, f]: rank r's sequence chunk first-dim-contiguous for TE's
    reduce-scatter along the first dimension."""
    b, full, f = x.shape
    return x.view(b, tp_size, full // tp_size, f).transpose(0, 1).reshape(tp_size * b, full // tp_size, f)


def te_to_ours_rows(y: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Inverse of ``ours_to_te_rows``: TE's gathered [tp*b, s, f] -> [b, tp*s, f]."""
    tb, s, f = y.shape
    b = tb // tp_size
    return y.view(tp_size, b, s, f).transpose(0, 1).reshape(b, tp_size * s, f)


# -- FP8 row padding ------------------------------------------------------------------------------------------
# TE's FP8 GEMMs need the token count (the rows of the flattened input) to be a multiple of 8/16 (32 for
# MXFP8's 1x32 blocks); a ViT tile has 1025 tokens. Like the torch path (``mllm.kernels.padding``), the TE
# linears pad their rows with zeros and drop the padded outputs: zero rows change no product, no amax (so no
# FP8 scale) and add nothing to the weight gradient. Under sequence parallelism each rank pads its own chunk,
# so TE's all-gather / reduce-scatter along the rows still exchanges equal chunks.
TE_ROW_MULTIPLE = 32


def _fp8_active() -> bool:
    """True inside TE's FP8 autocast (and when TE's state cannot be read: padding is always exact)."""
    te = transformer_engine()
    manager = getattr(getattr(te, "fp8", None), "FP8GlobalStateManager", None)
    return manager is None or bool(manager.is_fp8_enabled())


def _pad_chunks(x: torch.Tensor, chunks: int, multiple: int) -> tuple[torch.Tensor, int]:
    """[chunks * m, f] -> [chunks * m', f], each chunk's m rows zero-padded to m' (a multiple); returns m."""
    rows = x.reshape(chunks, -1, x.shape[-1])
    m = rows.shape[1]
    padded = torch.nn.functional.pad(rows, (0, 0, 0, -m % multiple))
    return padded.reshape(-1, x.shape[-1]), m


def _unpad_chunks(y: torch.Tensor, chunks: int, m: int) -> torch.Tensor:
    """Inverse of ``_pad_chunks`` on the output rows: [chunks * m', f] -> [chunks * m, f]."""
    return y.reshape(chunks, -1, y.shape[-1])[:, :m].reshape(-1, y.shape[-1])


@functools.cache
def _te_linear_classes() -> tuple[type, type]:
    """Subclasses of ``te.Linear`` (so parameter names stay ``weight``/``bias``) that fix the SP row order and
    pad the rows for FP8."""
    te = transformer_engine()

    class TEColumnParallelLinear(te.Linear):
        """``te.Linear(parallel_mode="column")``: ``weight`` [out/tp, in], ``bias`` [out/tp]."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            rows = x.numel() // x.shape[-1]
            gathered = self.tp_size if self.sequence_parallel else 1  # TE gathers every rank's rows
            if rows % TE_ROW_MULTIPLE == 0 or not _fp8_active():
                y = super().forward(x, *args, **kwargs)
            else:
                padded, _ = _pad_chunks(x, 1, TE_ROW_MULTIPLE)
                y = _unpad_chunks(super().forward(padded, *args, **kwargs), gathered, rows)
                y = y.view(gathered * x.shape[0], *x.shape[1:-1], y.shape[-1])
            return te_to_ours_rows(y, self.tp_size) if self.sequence_parallel else y

    class TERowParallelLinear(te.Linear):
        """``te.Linear(parallel_mode="row")``: ``weight`` [out, in/tp], full ``bias`` [out] after the reduction."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.sequence_parallel:
                x = ours_to_te_rows(x, self.tp_size)
            chunks = self.tp_size if self.sequence_parallel else 1  # TE reduce-scatters equal row chunks
            if (x.numel() // x.shape[-1]) % (chunks * TE_ROW_MULTIPLE) == 0 or not _fp8_active():
                return super().forward(x, *args, **kwargs)
            padded, m = _pad_chunks(x, chunks, TE_ROW_MULTIPLE)
            y = _unpad_chunks(super().forward(padded, *args, **kwargs), 1, m)
            return y.view(x.shape[0] // chunks, *x.shape[1:-1], y.shape[-1])

    return TEColumnParallelLinear, TERowParallelLinear


def te_linear(
    kind: str, in_features: int, out_features: int, *, bias: bool, tp: TPInfo, sequence_parallel: bool = False
) -> nn.Module:
    """A TE tensor-parallel linear (``kind`` "column" or "row") with the torch backend's names and shapes."""
    column, row = _te_linear_classes()
    cls = column if kind == "column" else row
    module = cls(
        in_features, out_features, bias=bias, parallel_mode=kind, tp_group=tp.group, tp_size=tp.size,
        sequence_parallel=sequence_parallel and tp.size > 1, device=_module_device(),
    )  # fmt: skip
    return torch_compatible_state_dict(module)


def _drop_kernel_state(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "kernels.")]:
        del state_dict[key]


def _allow_missing_kernel_state(module, incompatible_keys) -> None:
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        for key in [k for k in keys if ".kernels." in k or k.startswith("kernels.")]:
            keys.remove(key)


class TECoreAttention(nn.Module):
    """``te.DotProductAttention`` on local heads, called like ``CoreAttention``: ``(q, k, v, mask, scale)``.

    Head counts are read from the tensors (like the torch backend, so dummy heads need no special case); one TE
    module per (heads, kv heads, head dim, scale, layout) is created on first use and registered in ``kernels``
    (an ``nn.ModuleDict``: ``.to()``, ``.eval()`` and ``.apply()`` reach it). Parameter-free: its TE state (FP8
    ``_extra_state``) is left out of state dicts, which stay the torch backend's whether or not a kernel exists.
    """

    def __init__(self, attention_backend: str = "te") -> None:
        super().__init__()
        self.backend = attention_backend
        self.kernels = nn.ModuleDict()
        self._register_state_dict_hook(_drop_kernel_state)
        self.register_load_state_dict_post_hook(_allow_missing_kernel_state)

    def _kernel(self, heads: int, kv_heads: int, head_dim: int, scale: float, fmt: str, mask_type: str):
        key = f"{fmt}_{mask_type}_h{heads}_kv{kv_heads}_d{head_dim}_s{scale:.6e}".replace(".", "p")
        if key not in self.kernels:
            te = transformer_engine()
            kernel = te.DotProductAttention(
                heads, head_dim, num_gqa_groups=kv_heads, attention_dropout=0.0, qkv_format=fmt,
                attn_mask_type=mask_type, softmax_scale=scale,
            )  # fmt: skip
            self.kernels[key] = kernel.train(self.training)
        return self.kernels[key]

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float
    ) -> torch.Tensor:
        q, k, v = to_compute_dtype(q, k, v)
        b, s, heads, head_dim = q.shape
        kv_heads = k.shape[2]
        if mask.segment_ids is None:
            kernel = self._kernel(
                heads, kv_heads, head_dim, scale, "bshd", "causal" if mask.causal else "no_mask"
            )
            return kernel(q, k, v).view(b, s, heads, head_dim)
        cu, max_len = varlen_inputs(mask, q.device)
        mask_type = "padding_causal" if mask.causal else "padding"
        kernel = self._kernel(heads, kv_heads, head_dim, scale, "thd", mask_type)
        out = kernel(
            q.reshape(b * s, heads, head_dim), k.reshape(b * s, kv_heads, head_dim),
            v.reshape(b * s, kv_heads, head_dim), cu_seqlens_q=cu, cu_seqlens_kv=cu,
            max_seqlen_q=max_len, max_seqlen_kv=max_len,
        )  # fmt: skip
        return out.view(b, s, heads, head_dim)


class TELayerBackend:
    """The seam's three factories with Transformer Engine modules."""

    name = "te"

    def __init__(self) -> None:
        transformer_engine()  # fail early, with the one-line error, when TE is missing

    def column_linear(
        self, in_features: int, out_features: int, *, bias: bool, tp: TPInfo, sequence_parallel: bool = False
    ) -> nn.Module:
        return te_linear(
            "column", in_features, out_features, bias=bias, tp=tp, sequence_parallel=sequence_parallel
        )

    def row_linear(
        self, in_features: int, out_features: int, *, bias: bool, tp: TPInfo, sequence_parallel: bool = False
    ) -> nn.Module:
        return te_linear(
            "row", in_features, out_features, bias=bias, tp=tp, sequence_parallel=sequence_parallel
        )

    def core_attention(self, attention_backend: str, *, tp: TPInfo) -> nn.Module:
        return TECoreAttention(attention_backend)


# -- fused RMSNorm + SwiGLU MLP (opt-in) ---------------------------------------------------------------------
_FUSED_MLP_NAMES = {  # TE LayerNormMLP parameter -> torch backend parameter(s), relative to the decoder layer
    "mlp.layer_norm_weight": ("post_attention_layernorm.weight",),
    "mlp.fc1_weight": (
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
    ),  # [gate_local; up_local], TE's swiglu order
    "mlp.fc2_weight": ("mlp.down_proj.weight",),
}


def fused_mlp_to_torch_names(state_dict: dict, prefix: str) -> None:
    """Rewrite a fused layer's keys in place: fc1 splits into gate/up halves (local shards), norm renamed."""
    for te_name, torch_names in _FUSED_MLP_NAMES.items():
        key = prefix + te_name
        if key not in state_dict:
            continue
        value = state_dict.pop(key)
        parts = value.chunk(len(torch_names), dim=0) if len(torch_names) > 1 else (value,)
        for name, part in zip(torch_names, parts):
            state_dict[prefix + name] = part
    for key in [k for k in state_dict if k.startswith(prefix + "mlp.") and k.endswith("_extra_state")]:
        del state_dict[key]


def torch_names_to_fused_mlp(state_dict: dict, prefix: str) -> None:
    """Inverse of ``fused_mlp_to_torch_names`` (used on load)."""
    for te_name, torch_names in _FUSED_MLP_NAMES.items():
        keys = [prefix + name for name in torch_names]
        if all(k in state_dict for k in keys):
            parts = [state_dict.pop(k) for k in keys]
            state_dict[prefix + te_name] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def fuse_llm_mlp_te(
    layer: nn.Module,
    hidden_size: int,
    ffn_size: int,
    eps: float,
    *,
    tp: TPInfo,
    sequence_parallel: bool = False,
) -> nn.Module:
    """Replace ``layer.post_attention_layernorm`` + ``layer.mlp`` by one ``te.LayerNormMLP`` (RMSNorm, SwiGLU).

    The layer keeps computing ``x + mlp(post_attention_layernorm(x))`` (the norm becomes the identity, TE applies
    it inside). State dicts keep the torch backend's keys and local shards through hooks; note that
    ``named_parameters`` shows TE's names (``mlp.layer_norm_weight``, ``mlp.fc1_weight``, ``mlp.fc2_weight``),
    and under sequence parallelism ``mlp.layer_norm_weight`` is a sequence-parallel parameter (TE marks it with
    ``sequence_parallel=True``) whose gradient must be all-reduced over tp like the norm weights.
    """
    te = transformer_engine()
    mlp = te.LayerNormMLP(
        hidden_size, ffn_size, eps=eps, bias=False, normalization="RMSNorm", activation="swiglu",
        set_parallel_mode=True, tp_group=tp.group, tp_size=tp.size,
        sequence_parallel=sequence_parallel and tp.size > 1, device=_module_device(),
    )  # fmt: skip
    # Under sequence parallelism no row reordering is needed here (unlike a column linear feeding attention):
    # TE's all-gather after the norm and reduce-scatter after fc2 invert each other row by row, so each rank
    # gets its own [b, s/tp] rows back.
    # FP8 row padding (see TE_ROW_MULTIPLE), always on: one chunk per rank is exact also under sequence
    # parallelism, because the all-gather and the reduce-scatter inside return each rank its own rows.
    layer.mlp = pad_linear_rows(mlp, TE_ROW_MULTIPLE)
    layer.post_attention_layernorm = nn.Identity()
    layer._register_state_dict_hook(lambda m, sd, prefix, meta: fused_mlp_to_torch_names(sd, prefix))
    layer._register_load_state_dict_pre_hook(lambda sd, prefix, *args: torch_names_to_fused_mlp(sd, prefix))
    layer.register_load_state_dict_post_hook(_allow_missing_extra_state)
    return layer


# -- FP8 recipes -----------------------------------------------------------------------------------------------
def te_fp8_recipe(cfg: FP8Config):
    """The ``transformer_engine.common.recipe`` object for ``fp8.recipe``."""
    cfg.validate("te")
    recipe = require("transformer_engine.common.recipe", "transformer-engine", f"fp8.recipe={cfg.recipe}")
    hybrid = recipe.Format.HYBRID  # E4M3 forward, E5M2 gradients
    if cfg.recipe == "delayed":
        return recipe.DelayedScaling(fp8_format=hybrid, amax_history_len=1024, amax_compute_algo="max")
    if cfg.recipe == "current":
        return recipe.Float8CurrentScaling(fp8_format=hybrid)
    if cfg.recipe == "mxfp8":
        return recipe.MXFP8BlockScaling()
    return recipe.Float8BlockScaling()


def te_fp8_autocast(cfg: FP8Config, amax_group=None):
    """Context for the forward pass: TE FP8 with the configured recipe (a null context when disabled).

    ``amax_group``: the group over which delayed-scaling amaxes are reduced (data x tensor parallel).
    """
    if not cfg.enabled:
        return contextlib.nullcontext()
    te = transformer_engine()
    recipe = te_fp8_recipe(cfg)
    if hasattr(te, "autocast"):  # TE >= 2.8 spelling
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=amax_group)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=amax_group)
