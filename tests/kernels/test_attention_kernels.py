"""Packed-row attention kernels against the SDPA reference (dense block-diagonal mask), and kernel selection."""

from __future__ import annotations

import sys

import pytest
import torch

from mllm.kernels.deps import MissingDependencyError
from mllm.kernels.flex_attention import flex_attention_kernel
from mllm.kernels.varlen import cu_seqlens_from_segments, packed_varlen_attention, reference_varlen_attention
from mllm.model import build_model
from mllm.model.attention import AttentionMask, CoreAttention, resolve_attention_backend, sdpa_attention
from mllm.model.config import tiny

# Row 0: three samples and trailing padding; row 1: one sample filling the row; row 2: two samples, padding.
SEGMENTS = torch.tensor(
    [
        [1] * 11 + [2] * 17 + [3] * 5 + [0] * 7,
        [1] * 40,
        [1] * 3 + [2] * 30 + [0] * 7,
    ]
)


def _qkv(heads: int, kv_heads: int, seed: int = 0, head_dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    b, s = SEGMENTS.shape
    q = torch.randn(b, s, heads, head_dim, generator=gen)
    k = torch.randn(b, s, kv_heads, head_dim, generator=gen)
    v = torch.randn(b, s, kv_heads, head_dim, generator=gen)
    return q, k, v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_flex_matches_sdpa_on_packed_rows(causal: bool, heads: int, kv_heads: int) -> None:
    q, k, v = _qkv(heads, kv_heads)
    ref = sdpa_attention(q, k, v, AttentionMask(causal, SEGMENTS), 0.25)
    out = flex_attention_kernel(q, k, v, AttentionMask(causal, SEGMENTS), 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_backward_on_cpu_is_a_clear_error() -> None:
    # FlexAttention has no CPU backward (torch raises deep inside); the backend says what to use instead.
    q, k, v = (t.requires_grad_() for t in _qkv(6, 2, seed=1))
    with pytest.raises(RuntimeError, match="no backward pass on CPU.*use 'auto' or 'sdpa'"):
        flex_attention_kernel(q, k, v, AttentionMask(True, SEGMENTS), 0.25)


def test_flex_without_segments_uses_sdpa_semantics() -> None:
    q, k, v = _qkv(6, 2, seed=2)
    for causal in (True, False):
        ref = sdpa_attention(q, k, v, AttentionMask(causal), 0.25)
        torch.testing.assert_close(flex_attention_kernel(q, k, v, AttentionMask(causal), 0.25), ref)


def test_flex_block_mask_is_built_once_per_mask() -> None:
    q, k, v = _qkv(4, 4)
    mask = AttentionMask(True, SEGMENTS)
    flex_attention_kernel(q, k, v, mask, 0.25)
    cached = dict(mask._cache)
    flex_attention_kernel(q, k, v, mask, 0.25)
    assert len(cached) == 1 and all(mask._cache[key] is value for key, value in cached.items())


def test_model_with_flex_backend_matches_sdpa_backend() -> None:
    torch.manual_seed(0)
    ref_model = build_model(tiny()).eval()
    cfg = tiny()
    cfg.attention_backend = "flex"
    flex_model = build_model(cfg).eval()
    flex_model.load_state_dict(ref_model.state_dict())
    ids = torch.randint(0, 900, SEGMENTS.shape)
    with torch.no_grad():
        ref = ref_model(ids, segment_ids=SEGMENTS).logits
        out = flex_model(ids, segment_ids=SEGMENTS).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cu_seqlens_from_segments_by_hand() -> None:
    seg = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 2, 3, 3, 0, 0]])
    cu, max_len = cu_seqlens_from_segments(seg)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 2, 5, 6, 12, 13, 14, 16, 18]
    assert max_len == 6


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_glue_matches_sdpa(causal: bool) -> None:
    """The flash backend's packing glue (cu_seqlens, [total, H, D] reshapes) with flash-attn's varlen contract
    computed in plain torch; the flash-attn kernel itself is only exercised where it is installed (GPU)."""
    q, k, v = _qkv(6, 2, seed=3)
    mask = AttentionMask(causal, SEGMENTS)
    ref = sdpa_attention(q, k, v, mask, 0.25)
    out = packed_varlen_attention(q, k, v, mask, 0.25, reference_varlen_attention)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_auto_picks_sdpa_on_cpu_and_matches_it() -> None:
    from mllm.kernels.auto import select_attention_backend

    assert select_attention_backend("cpu") == "sdpa"
    q, k, v = _qkv(6, 2, seed=4)
    mask = AttentionMask(True, SEGMENTS)
    out = CoreAttention("auto")(q, k, v, mask, 0.25)
    torch.testing.assert_close(out, sdpa_attention(q, k, v, mask, 0.25), atol=0, rtol=0)


def test_flash_backend_missing_package_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn -> ImportError
    monkeypatch.delitem(sys.modules, "mllm.kernels.flash_attention", raising=False)
    with pytest.raises(MissingDependencyError) as err:
        resolve_attention_backend("flash")
    message = str(err.value)
    assert "\n" not in message
    assert "model.attention_backend='flash'" in message and "'flash-attn'" in message
    assert "pip install 'mllm[gpu]'" in message


def test_flash_backend_refuses_cpu_tensors() -> None:
    pytest.importorskip("flash_attn")
    q, k, v = _qkv(4, 4)
    with pytest.raises(RuntimeError, match="CUDA only"):
        resolve_attention_backend("flash")(q, k, v, AttentionMask(True, SEGMENTS), 0.25)


def test_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="model.attention_backend='nope' is unknown; available: .*sdpa"):
        CoreAttention("nope")
