"""The language model's HF config (InternLM2, Llama, Qwen2, Qwen3) <-> our TextConfig.

Both HF formats embed one of these: InternVL-Chat as ``llm_config`` (written by transformers 4.x: ``rope_theta`` +
``rope_scaling``), the transformers-native format as ``text_config`` (transformers 5: ``rope_parameters``).
"""

from __future__ import annotations

from typing import Any

from mllm.convert.errors import CheckpointError
from mllm.model.config import TextConfig

# HF architecture name -> our TextConfig.arch
ARCHITECTURES = {
    "InternLM2ForCausalLM": "internlm2",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
MODEL_TYPES = {"internlm2": "internlm2", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
ARCH_NAMES = {arch: name for name, arch in ARCHITECTURES.items()}


def text_arch(d: dict[str, Any], where: str) -> str:
    """Our arch name from an HF text config's ``architectures`` (or ``model_type``)."""
    names = d.get("architectures") or []
    if names:
        if names[0] not in ARCHITECTURES:
            raise CheckpointError(
                f"{where}: unknown language model architecture {names[0]!r}; supported: {', '.join(ARCHITECTURES)}"
            )
        return ARCHITECTURES[names[0]]
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{where}: unknown language model model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}"
        )
    return MODEL_TYPES[model_type]


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``."""
    params = d.get("rope_parameters")
    if params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling in ({"rope_type": "default"}, {"type": "default"}, {}):
            scaling = None
        return float(params.get("rope_theta", d.get("rope_theta", 10000.0))), scaling
    return float(d.get("rope_theta", 10000.0)), d.get("rope_scaling")


def _rope_type(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def _require(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: {message}")


def text_config_to_ours(d: dict[str, Any], arch: str, where: str) -> TextConfig:
    """An HF text config dict -> TextConfig. ``where`` names the file/key for error messages."""
    _require(
        d.get("hidden_act", "silu") == "silu",
        where,
        f"hidden_act {d.get('hidden_act')!r} unsupported (SwiGLU with silu only)",
    )
    theta, scaling = _rope_from_hf(d)
    heads = d["num_attention_heads"]
    if arch == "internlm2":
        # InternLM2Config's `bias` (default True) covers both wqkv and wo.
        qkv_bias = o_bias = bool(d.get("bias", True))
    elif arch == "llama":
        _require(not d.get("mlp_bias", False), where, "mlp_bias true is unsupported")
        qkv_bias = o_bias = bool(d.get("attention_bias", False))
    elif arch == "qwen2":  # biased q/k/v, unbiased o
        _require(not d.get("use_sliding_window", False), where, "use_sliding_window true is unsupported")
        qkv_bias, o_bias = True, False
    else:  # qwen3: one attention_bias flag (default False), per-head q/k norms
        _require(not d.get("use_sliding_window", False), where, "use_sliding_window true is unsupported")
        qkv_bias = o_bias = bool(d.get("attention_bias", False))
    return TextConfig(
        arch=arch,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim"),
        intermediate_size=d["intermediate_size"],
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=dict(scaling) if scaling else None,
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qk_norm=arch == "qwen3",
    )


def _common(t: TextConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "tie_word_embeddings": t.tie_word_embeddings,
    }
    if t.head_dim is not None or t.qk_norm:  # Qwen3Config's own default head_dim is 128, not width / heads
        out["head_dim"] = t.resolved_head_dim
    return out


def _bias_fields(t: TextConfig, arch: str, where: str) -> dict[str, Any]:
    _require(
        t.qk_norm == (arch == "qwen3"),
        where,
        f"{arch} {'needs' if arch == 'qwen3' else 'has no'} per-head q/k norms (model.text.qk_norm={t.qk_norm}); "
        "export a Qwen3 model as qwen3 only",
    )
    if arch == "qwen3":
        _require(t.qkv_bias == t.o_bias, where, "Qwen3 has one attention_bias flag for q/k/v and o")
        return {"attention_bias": t.qkv_bias}
    if arch == "qwen2":
        _require(
            t.qkv_bias and not t.o_bias,
            where,
            "Qwen2 needs qkv_bias=True and o_bias=False; export this model as llama or internlm2",
        )
        return {}
    _require(
        t.qkv_bias == t.o_bias,
        where,
        f"{arch} has one bias flag for q/k/v and o, got qkv_bias={t.qkv_bias} o_bias={t.o_bias}",
    )
    return {"bias": t.qkv_bias} if arch == "internlm2" else {"attention_bias": t.qkv_bias, "mlp_bias": False}


def text_config_legacy(t: TextConfig, arch: str, where: str) -> dict[str, Any]:
    """InternVL-Chat's ``llm_config`` (transformers 4.x style rope fields)."""
    out = {
        "architectures": [ARCH_NAMES[arch]],
        "model_type": arch,
        **_common(t),
        **_bias_fields(t, arch, where),
    }
    scaling = dict(t.rope_scaling) if t.rope_scaling else None
    if scaling and arch == "internlm2":
        # InternLM2's remote code reads rope_scaling["type"] and accepts exactly {type, factor}.
        scaling = {"type": _rope_type(scaling), "factor": scaling.get("factor")}
    out["rope_theta"] = t.rope_theta
    out["rope_scaling"] = scaling
    return out


def text_config_native(t: TextConfig, where: str) -> dict[str, Any]:
    """transformers 5 ``text_config``: InternLM2 becomes Llama (same math once wqkv is split)."""
    arch = t.arch if t.arch in ("qwen2", "qwen3") else "llama"
    out = {"model_type": arch, **_common(t), **_bias_fields(t, arch, where)}
    params: dict[str, Any] = {"rope_theta": t.rope_theta, "rope_type": _rope_type(t.rope_scaling)}
    for key, value in (t.rope_scaling or {}).items():
        if key not in ("type", "rope_type"):
            params[key] = value
    out["rope_parameters"] = params
    if arch in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
    return out
