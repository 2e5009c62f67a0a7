"""Single-device model behaviour that transformers' reference cannot show: packing, splicing, errors."""

from __future__ import annotations

import pytest
import torch

from mllm.model import build_model
from mllm.model.config import tiny
from mllm.model.internvl import default_position_ids
from mllm.model.projector import pixel_shuffle

IMG = 1000  # tiny()'s <IMG_CONTEXT> id


def _model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a wrong weight would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _sample(n_text: int, n_tiles: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    tokens_per_tile = tiny().num_image_token
    text = torch.randint(0, 900, (n_text,), generator=gen)
    if n_tiles == 0:
        return text, None
    ids = torch.cat([text[:2], torch.full((n_tiles * tokens_per_tile,), IMG), text[2:]])
    return ids, torch.randn(n_tiles, 3, 56, 56, generator=gen)


def test_packed_row_equals_separate_samples() -> None:
    model = _model()
    gen = torch.Generator().manual_seed(1)
    (ids_a, pix_a), (ids_b, pix_b), (ids_c, _) = _sample(9, 2, gen), _sample(7, 1, gen), _sample(6, 0, gen)
    pad = 3
    row = torch.cat([ids_a, ids_c, ids_b, torch.zeros(pad, dtype=torch.long)])[None]
    seg = torch.cat(
        [
            torch.full((len(ids_a),), 1),
            torch.full((len(ids_c),), 2),
            torch.full((len(ids_b),), 3),
            torch.zeros(pad),
        ]
    )[None].int()
    with torch.no_grad():
        packed = model(row, torch.cat([pix_a, pix_b]), segment_ids=seg).logits[0]
        alone = [
            model(ids_a[None], pix_a).logits[0],
            model(ids_c[None]).logits[0],
            model(ids_b[None], pix_b).logits[0],
        ]
    expected = torch.cat(alone)
    torch.testing.assert_close(packed[: len(expected)], expected, rtol=0, atol=1e-5)


def test_positions_restart_per_sample() -> None:
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0]])
    pos = default_position_ids(torch.zeros_like(seg), seg)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_image_token_count_mismatch_names_both_counts() -> None:
    model = _model()
    gen = torch.Generator().manual_seed(2)
    ids, pix = _sample(5, 2, gen)
    with pytest.raises(
        ValueError, match=r"4 <IMG_CONTEXT> tokens.*1 tiles x 4 = 4|8 <IMG_CONTEXT> tokens.*1 tiles"
    ):
        model(ids[None], pix[:1])


def test_text_only_batch_with_dummy_tile_touches_vision_weights() -> None:
    model = _model().train()
    ids = torch.randint(0, 900, (1, 12))
    out = model(ids, torch.zeros(1, 3, 56, 56), image_flags=torch.zeros(1, dtype=torch.long))
    out.logits.sum().backward()
    vision_grads = [p.grad for p in model.vision.parameters()]
    assert all(g is not None for g in vision_grads)
    assert all(torch.count_nonzero(g) == 0 for g in vision_grads)
    reference = _model().train()
    torch.testing.assert_close(out.logits, reference(ids).logits, rtol=0, atol=0)


def test_pixel_shuffle_matches_hand_reference() -> None:
    x = torch.randn(2, 4, 4, 3)
    out = pixel_shuffle(x, 0.5, "v2")
    # v2: output token (i, j) holds the 2x2 block of input patches at rows 2i..2i+1, cols 2j..2j+1, read
    # row-major: channels [x[2i,2j], x[2i,2j+1], x[2i+1,2j], x[2i+1,2j+1]] (derived by hand from the reshapes).
    for i in range(2):
        for j in range(2):
            want = torch.cat(
                [
                    x[:, 2 * i, 2 * j],
                    x[:, 2 * i, 2 * j + 1],
                    x[:, 2 * i + 1, 2 * j],
                    x[:, 2 * i + 1, 2 * j + 1],
                ],
                -1,
            )
            torch.testing.assert_close(out[:, i, j], want)
    # v1 is the same grid transposed.
    torch.testing.assert_close(pixel_shuffle(x, 0.5, "v1"), out.transpose(1, 2))


def test_select_layer_runs_only_needed_layers() -> None:
    full = _model()
    cut = _model(select_layer=-2)
    pix = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        x = full.vision.embeddings(pix)
        x = full.vision.layers[0](x)
        torch.testing.assert_close(cut.vision(pix), x)
        torch.testing.assert_close(_model(select_layer=0).vision(pix), full.vision.embeddings(pix))


def test_position_embedding_interpolates_for_other_sizes() -> None:
    model = _model()
    with torch.no_grad():
        out = model.vision.embeddings(torch.randn(2, 3, 84, 56))
    assert out.shape == (2, 1 + 6 * 4, 48)


def test_drop_path_is_identity_in_eval_and_scales_in_train() -> None:
    from mllm.model.vision import DropPath

    layer = DropPath(0.5)
    x = torch.ones(2000, 3)
    assert torch.equal(layer.eval()(x), x)
    y = layer.train()(x)
    kept = y[:, 0] != 0
    assert torch.all(y[kept] == 2.0)
    assert 0.4 < kept.float().mean() < 0.6


def test_invalid_config_is_a_one_line_error() -> None:
    cfg = tiny()
    cfg.text.num_kv_heads = 3
    with pytest.raises(ValueError, match="num_heads 4 must be a multiple of num_kv_heads 3"):
        build_model(cfg)


def test_attention_kernels_get_one_dtype_under_autocast() -> None:
    """fp32 weights + bf16 autocast: q/k leave the norms/RoPE in fp32 and v in bf16; kernels get one dtype."""
    from mllm.model.attention import register_attention_backend, sdpa_attention

    seen: list[tuple[torch.dtype, ...]] = []

    def recording(q, k, v, mask, scale):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa_attention(q, k, v, mask, scale)

    register_attention_backend("recording", recording)
    model = _model(attention_backend="recording")
    gen = torch.Generator().manual_seed(3)
    ids, pix = _sample(6, 1, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids[None], pix)
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen)
    seen.clear()
    model(ids[None], pix)  # without autocast nothing is cast
    assert all(dtypes == (torch.float32,) * 3 for dtypes in seen)
