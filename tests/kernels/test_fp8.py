"""FP8 (torchao float8) selection, exact row padding, and the one-line errors.

torchao's float8 runs emulated on CPU (exact FP8 rounding of operands and scales, fp32 matmul), so the module
selection, the padding exactness and state-dict compatibility are checked here; speed needs a GPU (bench/gpu.sh).
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from mllm.kernels.deps import MissingDependencyError
from mllm.kernels.fp8 import FP8Config, apply_fp8_training, fp8_module_filter, torchao_float8_config
from mllm.kernels.padding import pad_linear_rows, pad_rows
from mllm.model import build_model
from mllm.model.config import tiny


def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny())


def _selected(cfg: FP8Config, model: nn.Module) -> list[str]:
    keep = fp8_module_filter(cfg, tiny().text.num_layers)
    return sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear) and keep(m, name))


def test_filter_keeps_edges_projector_and_head_in_bf16() -> None:
    names = _selected(FP8Config(enabled=True), _tiny_model())
    llm_layers = {int(n.split(".")[2]) for n in names if n.startswith("llm.layers.")}
    assert llm_layers == {1, 2}  # 4 layers, first and last kept
    assert not any(n.startswith("projector.") for n in names) and "lm_head" not in names
    assert "vision.layers.0.attn.q_proj" in names and "llm.layers.1.mlp.down_proj" in names


def test_filter_options() -> None:
    model = _tiny_model()
    everything = _selected(FP8Config(bf16_llm_edge_layers=0, bf16_projector=False), model)
    assert {"projector.fc1", "projector.fc2", "llm.layers.0.self_attn.q_proj"} <= set(everything)
    no_vision = _selected(FP8Config(bf16_vision=True, keep_bf16=["*.mlp.down_proj"]), model)
    assert not any(n.startswith("vision.") or n.endswith("down_proj") for n in no_vision)


def test_filter_skips_widths_that_fp8_gemms_cannot_take() -> None:
    keep = fp8_module_filter(FP8Config(), num_llm_layers=4)
    assert not keep(nn.Linear(64, 1025), "vision.layers.0.mlp.fc1")
    assert keep(nn.Linear(64, 1040), "vision.layers.0.mlp.fc1")


def test_recipe_validation_names_the_choices() -> None:
    with pytest.raises(
        ValueError, match="fp8.recipe='delayed' is not a torch-backend recipe: use one of tensorwise"
    ):
        FP8Config(recipe="delayed").validate("torch")
    FP8Config(recipe="mxfp8").validate("te")


def test_missing_torchao_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(MissingDependencyError) as err:
        torchao_float8_config(FP8Config(enabled=True))
    message = str(err.value)
    assert "\n" not in message and "'torchao'" in message and "pip install 'mllm[gpu]'" in message


def test_padding_a_plain_linear_changes_nothing() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(32, 48)
    padded = pad_linear_rows(copy.deepcopy(linear))
    x = torch.randn(3, 1025 % 97, 32, requires_grad=True)  # 3 * 55 = 165 rows, not a multiple of 16
    assert pad_rows(x, 16)[0].shape[0] == 176
    ref = linear(x)
    out = padded(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, linear.weight, linear.bias), grad)
    out_grads = torch.autograd.grad(out, (x, padded.weight, padded.bias), grad)
    for a, b in zip(out_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert list(padded.state_dict()) == list(linear.state_dict())


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_padding_an_fp8_linear_changes_nothing(recipe: str) -> None:
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    config = torchao_float8_config(FP8Config(recipe=recipe, emulate=True))
    ref = Float8Linear.from_float(nn.Linear(48, 32), config=config)
    padded = pad_linear_rows(copy.deepcopy(ref))
    x = torch.randn(2, 17, 48, requires_grad=True)  # a tiny model's tile: 16 patches + CLS
    y_ref, y = ref(x), padded(x)
    assert torch.equal(y, y_ref)  # zero rows change no scale (tensorwise amax, per-row scales)
    grad = torch.randn_like(y_ref)
    ref_grads = torch.autograd.grad(y_ref, (x, ref.weight, ref.bias), grad)
    out_grads = torch.autograd.grad(y, (x, padded.weight, padded.bias), grad)
    for a, b in zip(out_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def _loss(model, ids, pixels, labels) -> torch.Tensor:
    logits = model(ids, pixel_values=pixels).logits
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def _batch(seed: int = 0):
    """Two rows of 20 text tokens around image tokens: row 0 with 2 tiles, row 1 with 1 tile (3 tiles)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = tiny()
    per_tile = cfg.num_image_token
    rows = []
    for n_tiles in (2, 1):
        text = torch.randint(0, 900, (20,), generator=gen)
        image = torch.full((2 * per_tile,), cfg.image_token_id)
        image[n_tiles * per_tile :] = text[0]  # equal row lengths: the second row gets text instead
        rows.append(torch.cat([text[:4], image, text[4:]]))
    ids = torch.stack(rows)
    pixels = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
    labels = torch.randint(0, 900, ids.shape, generator=gen)
    return ids, pixels, labels


def test_fp8_model_keeps_state_dict_and_stays_close_to_fp32() -> None:
    pytest.importorskip("torchao.float8")
    ref = _tiny_model()
    fp8 = copy.deepcopy(ref)
    converted = apply_fp8_training(fp8, FP8Config(enabled=True, emulate=True), tiny().text.num_layers)
    assert converted == _selected(FP8Config(enabled=True), ref)
    assert type(fp8.get_submodule("vision.layers.0.mlp.fc1")).__name__ == "RowPaddedFloat8Linear"
    assert {k: v.shape for k, v in fp8.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    batch = _batch()
    loss_ref, loss_fp8 = _loss(ref, *batch), _loss(fp8, *batch)
    assert abs(loss_fp8.item() - loss_ref.item()) / loss_ref.item() < 5e-2
    loss_fp8.backward()
    grad = fp8.get_submodule("vision.layers.0.mlp.fc1").weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_fp8_vision_rows_padded_equal_unpadded() -> None:
    """A whole model (17-token tiles, 3 tiles = 51 ViT rows) gives the same loss and gradients with and without
    the row padding, in emulated FP8."""
    pytest.importorskip("torchao.float8")
    import mllm.kernels.fp8 as fp8_module

    cfg = FP8Config(enabled=True, emulate=True)
    padded = _tiny_model()
    unpadded = copy.deepcopy(padded)
    apply_fp8_training(padded, cfg, 4)
    original = fp8_module.pad_linear_rows
    fp8_module.pad_linear_rows = lambda module, multiple: module
    try:
        apply_fp8_training(unpadded, cfg, 4)
    finally:
        fp8_module.pad_linear_rows = original
    assert type(unpadded.get_submodule("vision.layers.0.mlp.fc1")).__name__ == "Float8Linear"
    batch = _batch(1)
    loss_p, loss_u = _loss(padded, *batch), _loss(unpadded, *batch)
    assert torch.equal(loss_p, loss_u)
    loss_p.backward()
    loss_u.backward()
    for (name, a), (_, b) in zip(padded.named_parameters(), unpadded.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


class _LocalShardLinear(nn.Module):
    """Stand-in for a tensor-parallel linear at tp=1: the ``local_gemm`` protocol that apply_fp8_training uses."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * 0.1)
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1)
        self.local_gemm = nn.functional.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_gemm(x, self.weight, self.bias)


def test_local_gemm_hook_runs_the_shard_in_fp8() -> None:
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    shard = nn.Module()
    shard.vision = nn.Module()
    shard.vision.fc = _LocalShardLinear(48, 32)
    cfg = FP8Config(enabled=True, emulate=True)
    reference = Float8Linear.from_float(copy.deepcopy(shard.vision.fc), config=torchao_float8_config(cfg))
    assert apply_fp8_training(shard, cfg, num_llm_layers=0) == ["vision.fc"]
    assert list(shard.state_dict()) == ["vision.fc.weight", "vision.fc.bias"]
    x = torch.randn(5, 17, 48)
    assert torch.equal(shard.vision.fc(x), reference(x))


class _OpaqueShardLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 32, 32
        self.weight = nn.Parameter(torch.zeros(32, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


def test_parallel_linear_without_hook_is_an_error_not_silent_bf16() -> None:
    pytest.importorskip("torchao.float8")
    model = nn.Module()
    model.vision = nn.Module()
    model.vision.fc = _OpaqueShardLinear()
    with pytest.raises(ValueError, match=r"vision.fc \(_OpaqueShardLinear\).*local_gemm"):
        apply_fp8_training(model, FP8Config(enabled=True, emulate=True), num_llm_layers=0)


def test_fp8_on_tensor_parallel_linears_matches_single_device_fp8() -> None:
    """tp=1 parallel model (ColumnParallelLinear/RowParallelLinear through their local_gemm hook) vs the
    single-device model, same weights, both FP8 (emulated): same converted layers, same logits."""
    pytest.importorskip("torchao.float8")
    from mllm.model.internvl import InternVLModel
    from parallel.layers import TorchLayerBackend, TPInfo
    from parallel.tensor_parallel import parallelize_model_tp

    cfg_model = tiny()
    single = _tiny_model()
    parallel = InternVLModel(cfg_model)
    parallelize_model_tp(parallel, cfg_model, TPInfo(), TorchLayerBackend(), sequence_parallel=False)
    parallel.load_state_dict(single.state_dict())
    cfg = FP8Config(enabled=True, emulate=True)
    assert apply_fp8_training(parallel, cfg, 4) == apply_fp8_training(single, cfg, 4)
    assert type(parallel.get_submodule("llm.layers.1.mlp.up_proj")).__name__ == "ColumnParallelLinear"
    ids, pixels, labels = _batch(2)
    with torch.no_grad():
        ref = single(ids, pixel_values=pixels).logits
        out = parallel(ids, pixel_values=pixels).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
