"""Tiny random Hugging Face InternVL checkpoints for CPU tests (both formats), shared by several test files.

- ``tiny_hf_model``: transformers' own ``InternVLForConditionalGeneration`` (6B-style RMSNorm + QK-norm vision with
  an odd head count, or 300M-style LayerNorm + qkv-bias vision; Llama, Qwen2 or Qwen3 text with GQA; Qwen3 with
  per-head q/k norms and a head_dim apart from hidden_size / heads), all parameters
  random (norms and layer scale too) so parity tests can fail.
- ``write_internvl_chat_dir``: the remote-code InternVL-Chat layout written by hand (state dict + config.json),
  since the remote code cannot be downloaded here; InternLM2 (grouped ``wqkv``) or Llama/Qwen2/Qwen3 text.
- ``write_tokenizer_files``: a tokenizer_config.json carrying the added tokens the converter looks up.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 128
IMAGE_TOKEN_ID = 100  # <IMG_CONTEXT>
IM_END_ID = 101  # <|im_end|>
PAD_ID = 0
IMAGE_SIZE = 56  # 4x4 patches of 14 -> 2x2 = 4 LLM tokens per tile
TOKENS_PER_TILE = 4


def random_init_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Every parameter random: N(0, std), norm weights and layer scales N(1, std) / N(0.1, std)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            if ("norm" in name or "layernorm" in name) and name.endswith("weight"):
                noise += 1.0
            elif "lambda_" in name or name.endswith(("ls1", "ls2")):
                noise += 0.1
            p.copy_(noise.to(p.dtype))


def vision_config_dict(style: str) -> dict:
    """transformers InternVLVisionConfig kwargs: '6b' (RMSNorm, QK-norm, 3 heads) or '300m' (LayerNorm, bias)."""
    common = dict(
        hidden_size=48, num_hidden_layers=2, intermediate_size=96, image_size=IMAGE_SIZE, patch_size=14
    )
    if style == "6b":
        return dict(
            common, num_attention_heads=3, norm_type="rms_norm", use_qk_norm=True, attention_bias=False
        )
    return dict(common, num_attention_heads=4, norm_type="layer_norm", use_qk_norm=False, attention_bias=True)


QWEN3_HEAD_DIM = 24  # decoupled: 4 heads x 24 = 96 != hidden_size 64


def text_config(arch: str, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    if arch == "qwen3":
        kwargs["head_dim"] = QWEN3_HEAD_DIM
    kwargs.update(overrides)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch](**kwargs)


def tiny_hf_model(vision: str = "6b", text: str = "llama", seed: int = 0, tie: bool = False, **top):
    """A random transformers InternVLForConditionalGeneration in eval mode (fp32)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    rope = {"rope_type": "default", "rope_theta": 5000.0}
    cfg = InternVLConfig(
        vision_config=vision_config_dict(vision),
        text_config=text_config(text, rope_parameters=rope, tie_word_embeddings=tie),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=TOKENS_PER_TILE,
        tie_word_embeddings=tie,
        **top,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg)
    random_init_(model, seed)
    return model.eval()


def write_tokenizer_files(out_dir: Path, with_image_token: bool = True) -> None:
    added = {str(IM_END_ID): {"content": "<|im_end|>", "special": True}}
    if with_image_token:
        added[str(IMAGE_TOKEN_ID)] = {"content": "<IMG_CONTEXT>", "special": True}
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    (out_dir / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (out_dir / "tokenizer.model").write_bytes(b"\x00fake-sentencepiece\x01")


def save_hf_model(model, out_dir: Path, tokenizer: bool = True) -> Path:
    model.save_pretrained(out_dir)
    if tokenizer:
        write_tokenizer_files(out_dir)
    return out_dir


# -- InternVL-Chat (remote-code layout), written by hand -------------------------------------------------------
CHAT_VISION = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96)
CHAT_TEXT = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96
)


def internvl_chat_config(text: str = "internlm2", ps_version: str | None = "v2") -> dict:
    """An InternVL-Chat config.json as the V1-5 / InternVL2 releases write it (incl. fields we do not model)."""
    vision = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        **CHAT_VISION,
        "image_size": IMAGE_SIZE,
        "patch_size": 14,
        "num_channels": 3,
        "qkv_bias": False,
        "qk_normalization": True,
        "norm_type": "rms_norm",
        "layer_norm_eps": 1e-6,
        "drop_path_rate": 0.0,
        "initializer_factor": 0.1,
        "initializer_range": 1e-10,
        "use_flash_attn": True,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "hidden_act": "gelu",
        "torch_dtype": "bfloat16",
    }
    if text == "internlm2":
        llm = {
            "architectures": ["InternLM2ForCausalLM"],
            "model_type": "internlm2",
            "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"},
            "bias": False,
            "rope_theta": 1000000,
            "rope_scaling": {"type": "dynamic", "factor": 2.0},
            "attn_implementation": "eager",
        }
    else:
        name = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[text]
        llm = {"architectures": [name], "model_type": text, "rope_theta": 1000000.0, "rope_scaling": None}
        if text in ("qwen2", "qwen3"):
            llm.update(use_sliding_window=False, sliding_window=32768, max_window_layers=21)
        if text == "qwen3":  # as InternVL3.5's llm_config (Qwen3-8B) writes them
            llm.update(head_dim=QWEN3_HEAD_DIM, attention_bias=False)
    llm.update(
        CHAT_TEXT,
        vocab_size=VOCAB,
        hidden_act="silu",
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD_ID,
        use_cache=True,
        initializer_range=0.02,
    )
    cfg = {
        "_commit_hash": None,
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"},
        "model_type": "internvl_chat",
        "vision_config": vision,
        "llm_config": llm,
        "downsample_ratio": 0.5,
        "select_layer": -1,
        "template": "internlm2-chat",
        "force_image_size": IMAGE_SIZE,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    if ps_version is not None:
        cfg["ps_version"] = ps_version
    return cfg


def internvl_chat_state_dict(text: str = "internlm2", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the remote code's names and shapes for ``internvl_chat_config(text)``."""
    gen = torch.Generator().manual_seed(seed)
    c, f, d, ff = 48, 96, 64, 96
    hd, heads, kv = 16, 4, 2

    def rnd(*shape: int, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * 0.05 + mean

    sd = {
        "vision_model.embeddings.class_embedding": rnd(1, 1, c),
        "vision_model.embeddings.patch_embedding.weight": rnd(c, 3, 14, 14),
        "vision_model.embeddings.patch_embedding.bias": rnd(c),
        "vision_model.embeddings.position_embedding": rnd(1, 17, c),
        "mlp1.0.weight": rnd(4 * c, mean=1.0),
        "mlp1.0.bias": rnd(4 * c),
        "mlp1.1.weight": rnd(d, 4 * c),
        "mlp1.1.bias": rnd(d),
        "mlp1.3.weight": rnd(d, d),
        "mlp1.3.bias": rnd(d),
    }
    for i in range(2):
        p = f"vision_model.encoder.layers.{i}."
        sd.update(
            {
                p + "attn.qkv.weight": rnd(3 * c, c),
                p + "attn.q_norm.weight": rnd(c, mean=1.0),
                p + "attn.k_norm.weight": rnd(c, mean=1.0),
                p + "attn.proj.weight": rnd(c, c),
                p + "attn.proj.bias": rnd(c),
                p + "mlp.fc1.weight": rnd(f, c),
                p + "mlp.fc1.bias": rnd(f),
                p + "mlp.fc2.weight": rnd(c, f),
                p + "mlp.fc2.bias": rnd(c),
                p + "norm1.weight": rnd(c, mean=1.0),
                p + "norm2.weight": rnd(c, mean=1.0),
                p + "ls1": rnd(c, mean=0.1),
                p + "ls2": rnd(c, mean=0.1),
            }
        )
    if text == "internlm2":
        sd["language_model.model.tok_embeddings.weight"] = rnd(VOCAB, d)
        sd["language_model.model.norm.weight"] = rnd(d, mean=1.0)
        sd["language_model.output.weight"] = rnd(VOCAB, d)
        for i in range(2):
            p = f"language_model.model.layers.{i}."
            sd.update(
                {
                    p + "attention.wqkv.weight": rnd((heads + 2 * kv) * hd, d),
                    p + "attention.wo.weight": rnd(d, heads * hd),
                    p + "feed_forward.w1.weight": rnd(ff, d),
                    p + "feed_forward.w3.weight": rnd(ff, d),
                    p + "feed_forward.w2.weight": rnd(d, ff),
                    p + "attention_norm.weight": rnd(d, mean=1.0),
                    p + "ffn_norm.weight": rnd(d, mean=1.0),
                }
            )
        return sd
    sd["language_model.model.embed_tokens.weight"] = rnd(VOCAB, d)
    sd["language_model.model.norm.weight"] = rnd(d, mean=1.0)
    sd["language_model.lm_head.weight"] = rnd(VOCAB, d)
    bias = text == "qwen2"
    if text == "qwen3":
        hd = QWEN3_HEAD_DIM
    for i in range(2):
        p = f"language_model.model.layers.{i}."
        sd.update(
            {
                p + "self_attn.q_proj.weight": rnd(heads * hd, d),
                p + "self_attn.k_proj.weight": rnd(kv * hd, d),
                p + "self_attn.v_proj.weight": rnd(kv * hd, d),
                p + "self_attn.o_proj.weight": rnd(d, heads * hd),
                p + "mlp.gate_proj.weight": rnd(ff, d),
                p + "mlp.up_proj.weight": rnd(ff, d),
                p + "mlp.down_proj.weight": rnd(d, ff),
                p + "input_layernorm.weight": rnd(d, mean=1.0),
                p + "post_attention_layernorm.weight": rnd(d, mean=1.0),
            }
        )
        if text == "qwen3":
            sd[p + "self_attn.q_norm.weight"] = rnd(hd, mean=1.0)
            sd[p + "self_attn.k_norm.weight"] = rnd(hd, mean=1.0)
        if bias:
            sd.update(
                {
                    p + "self_attn.q_proj.bias": rnd(heads * hd),
                    p + "self_attn.k_proj.bias": rnd(kv * hd),
                    p + "self_attn.v_proj.bias": rnd(kv * hd),
                }
            )
    return sd


def write_internvl_chat_dir(
    out_dir: Path,
    text: str = "internlm2",
    ps_version: str | None = "v2",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(dtype) for k, v in internvl_chat_state_dict(text, seed).items()}
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = internvl_chat_config(text, ps_version)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        write_tokenizer_files(out_dir)
    return out_dir


# -- inputs ------------------------------------------------------------------------------------------------------
def sample_batch(seed: int = 0, seq: int = 24) -> dict[str, torch.Tensor]:
    """Two right-padded rows: row 0 has two images (2 tiles + 1 tile), row 1 is text only and shorter.

    Returns input_ids, attention_mask (1 = real), segment_ids (1 = real, 0 = pad) and pixel_values (3 tiles).
    """
    gen = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, IMAGE_TOKEN_ID - 1, (n,), generator=gen)  # noqa: E731
    img = lambda tiles: torch.full((tiles * TOKENS_PER_TILE,), IMAGE_TOKEN_ID)  # noqa: E731
    row0 = torch.cat([text(2), img(2), text(3), img(1), text(3)])  # 2 + 8 + 3 + 4 + 3 = 20
    row1 = text(13)
    ids = torch.full((2, seq), PAD_ID)
    mask = torch.zeros(2, seq, dtype=torch.long)
    for r, row in enumerate((row0, row1)):
        ids[r, : len(row)] = row
        mask[r, : len(row)] = 1
    pixel_values = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "segment_ids": mask.clone(),
        "pixel_values": pixel_values,
    }
