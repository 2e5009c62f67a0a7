"""LoRA adapters as InternVL's trainer offers them (``use_backbone_lora`` / ``use_llm_lora``), for one device.

InternVL wraps the ViT and the LLM with PEFT (``wrap_backbone_lora`` / ``wrap_llm_lora`` in
github.com/OpenGVLab/InternVL, ``internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py``):
rank r, ``lora_alpha = 2 r`` (``internvl_chat_finetune.py``), dropout 0.05, targets the ViT's ``attn.qkv``,
``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` and the LLM's attention and MLP projections (InternLM2's ``wqkv``,
``wo``, ``w1``, ``w2``, ``w3``; Llama/Qwen's ``q/k/v/o_proj``, ``gate/up/down_proj``). The wrapped model's
base weights are frozen.

Here an adapted linear keeps its own parameters and names and gains two children, ``lora_A`` [r, in] and
``lora_B`` [out, r] (PEFT's names), plus a forward hook adding ``scaling * B(A(dropout(x)))``; so base weights
load from and export to any checkpoint unchanged. Our fused-free layout has q, k and v as separate linears:
where InternVL adapts a fused ``qkv``/``wqkv`` with one rank-r adapter, we adapt q, k and v with one rank-r
adapter each (the PEFT export is per projection, as transformers' models are). Tensor parallelism re-attaches
sharded adapters from outside (``parallel.lora``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

VISION_TARGETS = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj", "mlp.fc1", "mlp.fc2"]
LLM_TARGETS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
ADAPTER_LEAVES = ("lora_A", "lora_B")


@dataclass
class LoraConfig:
    """Adapter ranks per part (0 = off). ``alpha`` None: 2 x rank, as InternVL. Targets are module-name
    suffixes in our layout (None: InternVL's defaults above)."""

    vision: int = 0
    llm: int = 0
    alpha: float | None = None
    dropout: float = 0.05
    vision_targets: list[str] | None = None
    llm_targets: list[str] | None = None

    @property
    def enabled(self) -> bool:
        return self.vision > 0 or self.llm > 0

    def part(self, name: str) -> tuple[int, float, list[str]]:
        """(rank, scaling alpha / rank, target suffixes) of part ``"vision"`` or ``"llm"``."""
        rank = self.vision if name == "vision" else self.llm
        targets = self.vision_targets if name == "vision" else self.llm_targets
        default = VISION_TARGETS if name == "vision" else LLM_TARGETS
        alpha = self.alpha if self.alpha is not None else 2.0 * rank
        return rank, (alpha / rank if rank else 0.0), list(targets if targets is not None else default)

    def validate(self) -> None:
        if self.vision < 0 or self.llm < 0:
            raise ValueError(f"lora.vision={self.vision} and lora.llm={self.llm} must be >= 0 (0 = off)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")


def resolve_lora(run_level: LoraConfig, model_level: LoraConfig) -> LoraConfig:
    """The model's adapters from a run's top-level ``lora`` key (or ``model.lora``, e.g. a recorded config);
    setting both differently is an error."""
    if not run_level.enabled:
        return model_level
    if model_level.enabled and model_level != run_level:
        raise ValueError(
            f"lora={run_level} and model.lora={model_level} disagree: set only the top-level lora"
        )
    return run_level


PART_PREFIXES = {"vision": ("vision.",), "llm": ("llm.", "lm_head.")}


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter (``...q_proj.lora_A.weight``)."""
    return any(f".{leaf}." in name for leaf in ADAPTER_LEAVES)


def adapted_modules(model: nn.Module, cfg: LoraConfig) -> Iterator[tuple[str, nn.Module, int, float]]:
    """(name, module, rank, scaling) of every linear that ``cfg`` adapts, in ``model.named_modules`` order."""
    for part in ("vision", "llm"):
        rank, scaling, targets = cfg.part(part)
        if not rank:
            continue
        for name, module in model.named_modules():
            if name.startswith(PART_PREFIXES[part][0]) and any(name.endswith("." + t) for t in targets):
                yield name, module, rank, scaling


def _single_device_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    x = module.lora_dropout(args[0])
    return output + module.lora_B(module.lora_A(x)) * module.lora_scaling


def attach_adapter(
    module: nn.Module,
    a_shape: tuple[int, int],
    b_shape: tuple[int, int],
    scaling: float,
    dropout: float,
    hook,
) -> None:
    """Give ``module`` children ``lora_A`` (weight ``a_shape``), ``lora_B`` (``b_shape``) and ``hook``."""
    module.lora_A = nn.Linear(a_shape[1], a_shape[0], bias=False)
    module.lora_B = nn.Linear(b_shape[1], b_shape[0], bias=False)
    module.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
    module.lora_scaling = scaling
    module.register_forward_hook(hook)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> None:
    """Adapters on every target linear of a single-device model (call before ``init_lora_``)."""
    cfg.validate()
    for _, module, rank, scaling in list(adapted_modules(model, cfg)):
        attach_adapter(
            module,
            (rank, module.in_features),
            (module.out_features, rank),
            scaling,
            cfg.dropout,
            _single_device_hook,
        )


@torch.no_grad()
def init_adapter_tensor(name: str, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """PEFT's default: A Kaiming-uniform (as ``nn.Linear``), B zero, so a fresh adapter changes nothing."""
    if ".lora_B." in name:
        tensor.zero_()
    else:
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def init_lora_(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if is_adapter_name(name):
            init_adapter_tensor(name, p.data)


def freeze_adapted_parts(model: nn.Module, cfg: LoraConfig) -> None:
    """Base weights of a part that has adapters are frozen (PEFT's ``get_peft_model``); adapters train."""
    frozen = tuple(p for part in ("vision", "llm") if cfg.part(part)[0] for p in PART_PREFIXES[part])
    for name, p in model.named_parameters():
        if is_adapter_name(name):
            p.requires_grad_(True)
        elif frozen and name.startswith(frozen):
            p.requires_grad_(False)


def adapter_pairs(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{base linear name: (A, B)} for every adapter in a full state dict."""
    return {
        name[: -len(".lora_A.weight")]: (sd[name], sd[name.replace(".lora_A.", ".lora_B.")])
        for name in sd
        if name.endswith(".lora_A.weight")
    }


def merge_lora(sd: Mapping[str, torch.Tensor], cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """A full state dict without adapters: each adapted weight becomes W + scaling B A (in fp32, then cast
    back to W's dtype), the model a plain one (``ModelConfig.lora`` off)."""
    out = {k: v for k, v in sd.items() if not is_adapter_name(k)}
    for base, (a, b) in adapter_pairs(sd).items():
        part = "vision" if base.startswith("vision.") else "llm"
        scaling = cfg.part(part)[1]
        w = out[f"{base}.weight"]
        out[f"{base}.weight"] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return out
