"""FP8 training on the torch backend through torchao's float8 (``torchao.float8``).

``apply_fp8_training(model, cfg, num_llm_layers)`` swaps the model's linears for torchao ``Float8Linear`` (same
parameters, same names, so checkpoints and the optimizer are unchanged) and makes every converted linear pad
its token rows to a multiple of 16 (``mllm.kernels.padding``: 1025-token ViT tiles), which changes no result.
Tensor-parallel linears keep their communication and run only their *local shard's* GEMM in FP8 through the
``local_gemm`` hook (see ``Float8LocalGemm``).

Kept in BF16 by default (``FP8Config``): the output layer (vocabulary width, and the logits are the most
precision-sensitive GEMM), the projector, the first and last ``bf16_llm_edge_layers`` LLM layers, any linear
whose in/out width is not a multiple of 16 (an FP8 GEMM requirement), and names matching ``keep_bf16``.

torchao releases pair with torch releases: torchao 0.17 is the first built for torch 2.11 (it requires
torch >= 2.11) and also runs on newer torch; ``bench/wheels/`` carries its py3-none-any wheel for offline GPU
machines. Without CUDA the GEMMs are emulated (exact FP8 rounding, fp32 matmul), which is what CPU tests use.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch

import torch
from torch import nn

from mllm.kernels.deps import require
from mllm.kernels.padding import FP8_ROW_MULTIPLE, pad_linear_rows

TORCHAO_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
TE_RECIPES = ("delayed", "current", "mxfp8", "blockwise")
_LLM_LAYER = re.compile(r"(?:^|\.)llm\.layers\.(\d+)\.")


@dataclass
class FP8Config:
    """FP8 options, shared by both backends; ``recipe`` is a torchao recipe (torch) or a TE recipe (te)."""

    enabled: bool = False
    recipe: str = "tensorwise"  # torch: tensorwise | rowwise | rowwise_with_gw_hp; te: delayed | current | mxfp8 | blockwise
    bf16_llm_edge_layers: int = 1  # the first and the last N LLM decoder layers stay in BF16
    bf16_projector: bool = True
    bf16_vision: bool = False
    keep_bf16: list[str] = field(default_factory=list)  # fnmatch patterns of module names kept in BF16
    emulate: bool | None = None  # None: emulate when CUDA is not available (CPU tests)

    def validate(self, backend: str = "torch") -> None:
        recipes = TE_RECIPES if backend == "te" else TORCHAO_RECIPES
        if self.recipe not in recipes:
            raise ValueError(
                f"fp8.recipe={self.recipe!r} is not a {backend}-backend recipe: use one of {', '.join(recipes)}"
            )
        if self.bf16_llm_edge_layers < 0:
            raise ValueError(f"fp8.bf16_llm_edge_layers must be >= 0, got {self.bf16_llm_edge_layers}")


def fp8_module_filter(cfg: FP8Config, num_llm_layers: int) -> Callable[[nn.Module, str], bool]:
    """``(module, fqn) -> bool``: True for the linears that run in FP8 (torchao's ``module_filter_fn``).

    Names are the single-device model's (``llm.layers.{i}.mlp.up_proj``, ``projector.fc1``, ...); ``i`` is the
    global layer index, so pipeline stages that keep global names filter the same layers.
    """
    edge = cfg.bf16_llm_edge_layers

    def keep_fp8(module: nn.Module, fqn: str) -> bool:
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if in_f is None or out_f is None:
            return False
        local_out, local_in = module.weight.shape
        if local_in % 16 or local_out % 16:
            return False
        if fqn == "lm_head" or fqn.endswith(".lm_head"):
            return False
        if fqn.endswith((".lora_A", ".lora_B")):  # rank-r LoRA adapters: tiny GEMMs, kept in BF16
            return False
        if cfg.bf16_projector and (fqn.startswith("projector.") or ".projector." in fqn):
            return False
        if cfg.bf16_vision and (fqn.startswith("vision.") or ".vision." in fqn):
            return False
        match = _LLM_LAYER.search(fqn)
        if match and (int(match.group(1)) < edge or int(match.group(1)) >= num_llm_layers - edge):
            return False
        return not any(fnmatch(fqn, pattern) for pattern in cfg.keep_bf16)

    return keep_fp8


def torchao_float8_config(cfg: FP8Config, device: torch.device | None = None):
    """torchao ``Float8LinearConfig`` for ``cfg.recipe``; emulated when there is no CUDA device."""
    require(
        "torchao.float8",
        "torchao",
        "fp8.enabled=true (torch backend)",
        hint="a torchao paired with your torch",
    )
    from torchao.float8 import Float8LinearConfig

    cfg.validate("torch")
    emulate = cfg.emulate
    if emulate is None:
        emulate = not (torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"))
    return dataclasses.replace(Float8LinearConfig.from_recipe_name(cfg.recipe), emulate=emulate)


class Float8LocalGemm:
    """``local_gemm(x, weight, bias)`` in FP8 for a tensor-parallel linear's local shard.

    Holds a torchao ``Float8Linear`` that shares the shard's ``weight`` Parameter (not registered as a submodule:
    names and state dicts are unchanged); the bias is added by the caller's arithmetic, after any reduction.
    Rows are padded to a multiple of 16 like the plain linears.
    """

    def __init__(self, weight: nn.Parameter, float8_config) -> None:
        from torchao.float8.float8_linear import Float8Linear

        shim = nn.Module()
        shim.in_features, shim.out_features = weight.shape[1], weight.shape[0]
        shim.weight, shim.bias = weight, None
        self.linear = pad_linear_rows(Float8Linear.from_float(shim, config=float8_config), FP8_ROW_MULTIPLE)

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if weight is not self.linear.weight:  # the owner's Parameter was replaced (e.g. moved to a device)
            self.linear.weight = weight
        out = self.linear(x)
        return out if bias is None else out + bias.to(out.dtype)


def apply_fp8_training(model: nn.Module, cfg: FP8Config, num_llm_layers: int) -> list[str]:
    """Run the selected linears of ``model`` in FP8 (torchao); returns the converted module names.

    Plain ``nn.Linear`` modules are swapped for ``Float8Linear``; tensor-parallel linears (anything with a
    ``local_gemm`` attribute, see ``parallel.layers``) get a ``Float8LocalGemm`` for their local shard.
    """
    float8_config = torchao_float8_config(cfg, next(model.parameters()).device)
    from torchao.float8 import convert_to_float8_training

    keep = fp8_module_filter(cfg, num_llm_layers)
    converted: list[str] = []

    def plain_linear_filter(module: nn.Module, fqn: str) -> bool:
        ok = type(module) is nn.Linear and keep(module, fqn)
        if ok:
            converted.append(fqn)
        return ok

    convert_to_float8_training(model, module_filter_fn=plain_linear_filter, config=float8_config)
    for fqn in converted:
        pad_linear_rows(model.get_submodule(fqn), FP8_ROW_MULTIPLE)
    unhooked = []
    for fqn, module in model.named_modules():
        if fqn in converted or not keep(module, fqn):
            continue
        if hasattr(module, "local_gemm"):
            module.local_gemm = Float8LocalGemm(module.weight, float8_config)
            converted.append(fqn)
        elif not isinstance(module, nn.Linear):
            unhooked.append(f"{fqn} ({type(module).__name__})")
    if unhooked:
        # Running them silently in BF16 would misreport what was measured.
        raise ValueError(
            f"fp8.enabled: {len(unhooked)} linear-like modules cannot run in FP8, e.g. {unhooked[0]}: a "
            f"tensor-parallel linear must compute its local GEMM through a `local_gemm(x, weight, bias)` attribute"
        )
    return sorted(converted)
