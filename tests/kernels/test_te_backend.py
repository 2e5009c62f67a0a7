"""Transformer Engine backend on CPU: errors, row order, and state-dict NAMING/SHAPE compatibility.

TE cannot run here. The compatibility tests use ``fake_transformer_engine`` (documented TE names, shapes and
call signatures, torch math): they check OUR side - parameter names, local shards, the fc1 = [gate; up] layout,
THD reshapes - not TE. Whether TE computes the same loss is what ``bench/te_parity.py`` checks where TE exists.
"""

from __future__ import annotations

import sys

import fake_transformer_engine  # tests/kernels/, on sys.path under pytest's default import mode
import pytest
import torch

import parallel.te_backend as te_backend
from mllm.kernels.deps import MissingDependencyError
from mllm.kernels.fp8 import FP8Config
from mllm.model import build_model
from mllm.model.config import tiny
from mllm.model.internvl import InternVLModel
from parallel.backends import get_layer_backend
from parallel.layers import TorchLayerBackend, TPInfo
from parallel.tensor_parallel import parallelize_model_tp


@pytest.fixture
def fake_te(monkeypatch: pytest.MonkeyPatch):
    te_backend._te_linear_classes.cache_clear()
    yield fake_transformer_engine.install(monkeypatch)
    te_backend._te_linear_classes.cache_clear()


def test_missing_transformer_engine_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    with pytest.raises(MissingDependencyError) as err:
        get_layer_backend("te")
    message = str(err.value)
    assert "\n" not in message and "parallel.layer_backend=te" in message
    assert "'transformer-engine'" in message and "pip install 'mllm[gpu]'" in message


def test_te_fp8_recipe_names_the_te_choices() -> None:
    with pytest.raises(
        ValueError, match="fp8.recipe='rowwise' is not a te-backend recipe: use one of delayed"
    ):
        te_backend.te_fp8_recipe(FP8Config(recipe="rowwise"))


def test_sequence_parallel_row_order_round_trip() -> None:
    b, tp, s_local, f = 2, 2, 3, 4
    x = torch.arange(b * tp * s_local * f, dtype=torch.float32).view(b, tp * s_local, f)
    te_rows = te_backend.ours_to_te_rows(x, tp)
    # TE reduce-scatters along dim 0: rank r must receive exactly its sequence chunk of every row.
    for r in range(tp):
        torch.testing.assert_close(te_rows[r * b : (r + 1) * b], x[:, r * s_local : (r + 1) * s_local])
    torch.testing.assert_close(te_backend.te_to_ours_rows(te_rows, tp), x)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fuse_mlp", [False, True])
def test_naming_and_local_shards_match_torch_backend_at_tp2(fake_te, fuse_mlp: bool) -> None:
    """NAMING/SHAPE test with a fake TE: rank 0 of tp=2 with sequence parallelism, on the meta device."""
    cfg = tiny()
    tp = TPInfo(size=2, rank=0, group=None)
    with torch.device("meta"):
        ours, theirs = InternVLModel(cfg), InternVLModel(cfg)
        parallelize_model_tp(ours, cfg, tp, TorchLayerBackend(), sequence_parallel=True)
        parallelize_model_tp(theirs, cfg, tp, te_backend.TELayerBackend(), sequence_parallel=True)
        if fuse_mlp:
            t = cfg.text
            for layer in theirs.llm.layers:
                te_backend.fuse_llm_mlp_te(
                    layer, t.hidden_size, t.intermediate_size, t.rms_norm_eps, tp=tp, sequence_parallel=True
                )
    assert type(theirs.llm.layers[0].self_attn.q_proj).__name__ == "TEColumnParallelLinear"
    assert _shapes(theirs) == _shapes(ours)


@pytest.mark.parametrize("fuse_mlp", [False, True])
def test_torch_checkpoint_loads_into_te_model_and_gives_same_logits(fake_te, fuse_mlp: bool) -> None:
    """NAMING test with a fake TE (torch math): a torch-backend state dict loads strictly into the TE-backend
    model and every tensor lands where it is used (same logits on packed rows, vision tiles included)."""
    torch.manual_seed(0)
    cfg = tiny()
    reference = build_model(cfg).eval()
    model = InternVLModel(cfg)
    parallelize_model_tp(model, cfg, TPInfo(), te_backend.TELayerBackend(), sequence_parallel=False)
    if fuse_mlp:
        t = cfg.text
        for layer in model.llm.layers:
            te_backend.fuse_llm_mlp_te(layer, t.hidden_size, t.intermediate_size, t.rms_norm_eps, tp=TPInfo())
    model.load_state_dict(reference.state_dict(), strict=True)
    assert list(model.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=0, rtol=0)
    model.eval()
    seg = torch.tensor([[1] * 30 + [2] * 10 + [0] * 4, [1] * 44])
    ids = torch.randint(0, 900, seg.shape)
    ids[0, 2 : 2 + cfg.num_image_token] = cfg.image_token_id
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ref = reference(ids, pixel_values=pixels, segment_ids=seg).logits
        out = model(ids, pixel_values=pixels, segment_ids=seg).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fp8_rows_are_padded_and_attention_kernels_are_submodules(fake_te, monkeypatch) -> None:
    """Fake TE (torch math) with its FP8 row check on: 17-token ViT tiles and 44-token rows go through padded,
    with unchanged logits; the lazily created attention kernels are real submodules that stay out of state
    dicts."""
    torch.manual_seed(0)
    cfg = tiny()
    reference = build_model(cfg).eval()
    model = InternVLModel(cfg)
    parallelize_model_tp(model, cfg, TPInfo(), te_backend.TELayerBackend(), sequence_parallel=False)
    model.load_state_dict(reference.state_dict(), strict=True)
    model.eval()
    monkeypatch.setattr(fake_te.fp8.FP8GlobalStateManager, "FP8_ENABLED", True)
    with pytest.raises(AssertionError, match="divisible by 16"):  # the fake's check is real
        fake_te.Linear(8, 8, device="cpu")(torch.randn(17, 8))
    seg = torch.tensor([[1] * 30 + [2] * 10 + [0] * 4])
    ids = torch.randint(0, 900, seg.shape)
    ids[0, 2 : 2 + cfg.num_image_token] = cfg.image_token_id
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ref = reference(ids, pixel_values=pixels, segment_ids=seg).logits
        out = model(ids, pixel_values=pixels, segment_ids=seg).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    kernels = [m for m in model.modules() if isinstance(m, fake_te.DotProductAttention)]
    assert len(kernels) == cfg.vision.num_layers + cfg.text.num_layers  # one per layer: bshd ViT, thd LLM
    assert not any(k.training for k in kernels)
    model.train()
    assert all(k.training for k in kernels)
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)


def test_sequence_parallel_padding_pads_each_ranks_chunk() -> None:
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(6, 4)  # 2 rank chunks of 3 rows
    padded, m = te_backend._pad_chunks(x, 2, 8)
    assert m == 3 and padded.shape == (16, 4)
    torch.testing.assert_close(padded[:3], x[:3])
    torch.testing.assert_close(padded[8:11], x[3:])
    assert not padded[3:8].any() and not padded[11:].any()
    torch.testing.assert_close(te_backend._unpad_chunks(padded, 2, m), x)


def test_layer_backends_are_looked_up_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import parallel.backends as backends

    monkeypatch.setattr(backends, "_REGISTERED", {})
    backends.register_layer_backend("mine", TorchLayerBackend)
    assert isinstance(get_layer_backend("mine"), TorchLayerBackend)
    assert isinstance(get_layer_backend("torch"), TorchLayerBackend)
    with pytest.raises(ValueError, match=r"'nope' is unknown; available: \['mine', 'te', 'torch'\]"):
        get_layer_backend("nope")


def test_fp8_padding_under_sequence_parallelism_keeps_each_ranks_rows(fake_te, monkeypatch) -> None:
    """Fake TE whose SP linears gather / reduce-scatter identical ranks in one process, FP8 row check on:
    9 local rows (not a multiple of 16) come out in our [batch, seq] order, padding removed per rank chunk."""
    monkeypatch.setattr(fake_te.fp8.FP8GlobalStateManager, "FP8_ENABLED", True)
    tp = TPInfo(size=2, rank=0, group=None)
    column = te_backend.te_linear("column", 8, 32, bias=False, tp=tp, sequence_parallel=True)
    row = te_backend.te_linear("row", 32, 8, bias=False, tp=tp, sequence_parallel=True)
    for linear in (column, row):
        torch.nn.init.normal_(linear.weight)
    x = torch.randn(1, 9, 8)  # this rank's sequence chunk
    local = torch.nn.functional.linear(x, column.weight)
    torch.testing.assert_close(column(x), torch.cat([local, local], dim=1))  # [1, 18, 16]: the full sequence
    h = torch.randn(1, 18, 16)
    # rank 0 receives the sum over the 2 (identical) ranks of its own sequence chunk
    torch.testing.assert_close(row(h), 2 * torch.nn.functional.linear(h[:, :9], row.weight))
