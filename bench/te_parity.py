"""TE backend vs torch backend on one GPU: the check to run where Transformer Engine is installed.

    PYTHONPATH=. python bench/te_parity.py [--recipe current]

A small InternVL-shaped model (224 px tiles, GQA LLM, packed rows) is built once; the torch backend (tp1,
``parallel.layers`` torch modules) and the TE backend (``parallel.te_backend``: te.Linear, te.DotProductAttention
on THD packed rows, optionally te.LayerNormMLP) load the SAME state dict - the checkpoint-compatibility path -
and train 8 AdamW steps on the same batch:

- BF16: TE loss within 1e-2 relative of the torch backend at every step;
- FP8 (TE recipe, default ``current``; ``delayed``/``blockwise`` on Hopper, ``mxfp8`` on Blackwell): within 5e-2
  of TE BF16;
- and the TE model's state dict round-trips into a fresh torch-backend model (same keys, same tensors).

Prints a table and a final JSON line; exits 1 when a check fails. Unmeasured by us (no TE on our machines).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys

import torch

from mllm.kernels.fp8 import FP8Config
from mllm.model import build_model
from mllm.model.internvl import InternVLModel
from parallel.layers import TorchLayerBackend, TPInfo
from parallel.tensor_parallel import parallelize_model_tp

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gpu_bench import lm_loss, max_rel, packed_row, small_config  # noqa: E402

STEPS = 8


def backend_model(cfg, state: dict, backend, fuse_mlp: bool = False) -> InternVLModel:
    model = InternVLModel(cfg)
    parallelize_model_tp(model, cfg, TPInfo(), backend, sequence_parallel=False)
    if fuse_mlp:
        from parallel.te_backend import fuse_llm_mlp_te

        t = cfg.text
        for layer in model.llm.layers:
            fuse_llm_mlp_te(layer, t.hidden_size, t.intermediate_size, t.rms_norm_eps, tp=TPInfo())
    model.to("cuda")
    model.load_state_dict(state, strict=True)
    return model


def train(model, batch, ctx) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16), ctx():
            loss = lm_loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="current", choices=["delayed", "current", "mxfp8", "blockwise"])
    parser.add_argument("--fuse-mlp", action="store_true", help="also fuse norm + MLP into te.LayerNormMLP")
    args = parser.parse_args()
    from parallel.te_backend import TELayerBackend, te_fp8_autocast

    cfg = small_config()
    cfg.attention_backend = "sdpa"  # the torch backend's reference kernel
    torch.manual_seed(0)
    state = build_model(cfg, "cuda").state_dict()
    batch = packed_row(cfg, samples=2, tokens_per_sample=512, tiles_per_sample=2, device="cuda")
    fp8 = FP8Config(enabled=True, recipe=args.recipe)

    torch_losses = train(backend_model(cfg, state, TorchLayerBackend()), batch, contextlib.nullcontext)
    te_bf16 = train(backend_model(cfg, state, TELayerBackend(), args.fuse_mlp), batch, contextlib.nullcontext)
    te_model = backend_model(cfg, state, TELayerBackend(), args.fuse_mlp)
    te_fp8 = train(te_model, batch, lambda: te_fp8_autocast(fp8))

    te_state = te_model.state_dict()
    round_trip = backend_model(cfg, copy.deepcopy(te_state), TorchLayerBackend()).state_dict()
    # Compared by key (a zip over values would pair the wrong tensors if the key orders differed).
    same_keys = list(te_state) == list(state) and list(round_trip) == list(state)
    same_tensors = same_keys and all(torch.equal(round_trip[k], te_state[k]) for k in state)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformer_engine": __import__("transformer_engine").__version__,
        "recipe": args.recipe,
        "fuse_mlp": args.fuse_mlp,
        "torch_bf16": torch_losses,
        "te_bf16": te_bf16,
        "te_fp8": te_fp8,
        "te_bf16_vs_torch": max_rel(te_bf16, torch_losses),
        "te_fp8_vs_te_bf16": max_rel(te_fp8, te_bf16),
        "state_dict_round_trip": same_tensors,
    }
    result["pass"] = (
        result["te_bf16_vs_torch"] <= 1e-2
        and result["te_fp8_vs_te_bf16"] <= 5e-2
        and result["state_dict_round_trip"]
    )
    print(f"{'step':>4}{'torch bf16':>12}{'TE bf16':>12}{'TE fp8':>12}")
    for i, (a, b, c) in enumerate(zip(torch_losses, te_bf16, te_fp8)):
        print(f"{i:>4}{a:>12.5f}{b:>12.5f}{c:>12.5f}")
    print(
        f"TE bf16 vs torch: {result['te_bf16_vs_torch']:.2e} (<= 1e-2); TE fp8 ({args.recipe}) vs TE bf16: "
        f"{result['te_fp8_vs_te_bf16']:.2e} (<= 5e-2); state dict round trip: {result['state_dict_round_trip']}"
    )
    print(json.dumps(result))
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
