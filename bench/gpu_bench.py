"""Single-GPU benchmark of the fast path (run by bench/gpu.sh; needs only torch, Triton, torchao and this repo).

1. Parity on a small model: 8 AdamW steps in fp32 (reference), BF16 autocast and BF16 + FP8 (torchao), same
   init and batch; the largest relative loss difference per step. Pass: BF16 <= 1e-2 of fp32, FP8 <= 5e-2 of BF16.
2. Throughput of a full-width slice: 2 InternViT-6B layers + projector + 2 InternLM2-20B layers, one packed
   row of 8192 tokens (4 samples of 2048 tokens, 2 tiles each = 8 tiles), tp1, BF16 autocast with fp32 master
   weights. Forward + backward timed (the output head is left out: in a 2-layer slice a 92k-vocab head would be
   ~40% of the FLOPs, in the real 48-layer model ~3%); the fused AdamW step is timed separately. MFU =
   model FLOPs (``mllm.train.flops``, no head) / fwd+bwd time / the card's dense BF16 peak.
3. With Transformer Engine importable: the same slice through ``parallel.layer_backend=te`` (BF16, FP8).

Prints a table and a final JSON line. ``--budget-s`` stops starting new configurations past that many seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import time

import torch
import torch.nn.functional as F

from mllm.kernels.compile import compile_blocks
from mllm.kernels.deps import is_available
from mllm.kernels.fp8 import FP8Config, apply_fp8_training
from mllm.kernels.optim import build_adamw
from mllm.model import build_model
from mllm.model.config import ModelConfig, TextConfig, VisionConfig, internvl_chat_v1_5
from mllm.train.flops import TrainedParts, peak_tflops_for, step_flops

START = time.monotonic()


DEVICE = "cuda"


# -- batches -------------------------------------------------------------------------------------------------
def text_vocab(cfg: ModelConfig) -> int:
    """Ids below every special token (so no random id is an <IMG_CONTEXT>)."""
    return min(cfg.text.vocab_size, cfg.image_token_id) - 16


def packed_row(cfg: ModelConfig, samples: int, tokens_per_sample: int, tiles_per_sample: int, device, seed=0):
    """One packed row: each sample = 2 text tokens, its tiles' <IMG_CONTEXT> tokens, then text."""
    gen = torch.Generator().manual_seed(seed)
    per_tile = cfg.num_image_token
    ids, seg = [], []
    for i in range(samples):
        sample = torch.randint(0, text_vocab(cfg), (tokens_per_sample,), generator=gen)
        sample[2 : 2 + tiles_per_sample * per_tile] = cfg.image_token_id
        ids.append(sample)
        seg.append(torch.full((tokens_per_sample,), i + 1))
    size = cfg.vision.image_size
    return {
        "input_ids": torch.cat(ids)[None].to(device),
        "segment_ids": torch.cat(seg)[None].to(device),
        "pixel_values": torch.randn(samples * tiles_per_sample, 3, size, size, generator=gen).to(device),
        "labels": torch.randint(0, text_vocab(cfg), (1, samples * tokens_per_sample), generator=gen).to(
            device
        ),
    }


def lm_loss(model, batch) -> torch.Tensor:
    logits = model(batch["input_ids"], batch["pixel_values"], batch["segment_ids"]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())


def slice_loss(model, batch) -> torch.Tensor:
    """Embeddings (image tokens spliced) -> decoder layers -> final norm; a cheap scalar instead of a head."""
    hidden = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
    from mllm.model.internvl import default_position_ids

    pos = default_position_ids(batch["input_ids"], batch["segment_ids"])
    hidden = model.llm.norm(model.decode(hidden, pos, batch["segment_ids"]))
    return hidden.float().square().mean()


def autocast(dtype: torch.dtype | None):
    return torch.autocast(DEVICE, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# -- 1. parity ------------------------------------------------------------------------------------------------
def small_config() -> ModelConfig:
    """224 px tiles (257 ViT tokens: exercises the FP8 row padding), GQA LLM; all widths multiples of 16."""
    return ModelConfig(
        vision=VisionConfig(
            hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024, image_size=224
        ),
        text=TextConfig(
            hidden_size=512,
            num_layers=4,
            num_heads=8,
            num_kv_heads=4,
            intermediate_size=1408,
            vocab_size=8192,
            rope_theta=10000.0,
            max_position_embeddings=4096,
        ),  # fmt: skip
        image_token_id=8000,
        attention_backend="auto",
    )


def train_losses(model, batch, steps: int, dtype, extra_ctx=contextlib.nullcontext) -> list[float]:
    opt = build_adamw(model.parameters(), "auto", lr=3e-4, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with autocast(dtype), extra_ctx():
            loss = lm_loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def run_parity(steps: int = 8) -> dict:
    cfg = small_config()
    torch.manual_seed(0)
    base = build_model(cfg, DEVICE)
    tokens = 160 if SMOKE else 512  # 2 tiles = 128 image tokens per sample
    batch = packed_row(cfg, samples=2, tokens_per_sample=tokens, tiles_per_sample=2, device=DEVICE)
    fp32 = train_losses(copy.deepcopy(base), batch, steps, None)
    bf16 = train_losses(copy.deepcopy(base), batch, steps, torch.bfloat16)
    results = {"fp32_losses": fp32, "bf16_losses": bf16, "bf16_vs_fp32": max_rel(bf16, fp32)}
    for recipe in ("tensorwise", "rowwise"):
        model = copy.deepcopy(base)
        apply_fp8_training(model, FP8Config(enabled=True, recipe=recipe), cfg.text.num_layers)
        losses = train_losses(model, batch, steps, torch.bfloat16)
        results[f"fp8_{recipe}_losses"] = losses
        results[f"fp8_{recipe}_vs_bf16"] = max_rel(losses, bf16)
        results[f"fp8_{recipe}_vs_fp32"] = max_rel(losses, fp32)
    results["pass"] = results["bf16_vs_fp32"] <= 1e-2 and all(
        results[f"fp8_{r}_vs_bf16"] <= 5e-2 for r in ("tensorwise", "rowwise")
    )
    return results


# -- 2. throughput --------------------------------------------------------------------------------------------
def slice_config(attention_backend: str = "auto") -> ModelConfig:
    cfg = small_config() if SMOKE else internvl_chat_v1_5()
    cfg.vision.num_layers, cfg.text.num_layers = 2, 2
    cfg.attention_backend = attention_backend
    return cfg


SLICE = {"samples": 4, "tokens_per_sample": 2048, "tiles_per_sample": 2}  # 8192 tokens, 8 tiles
SMOKE = False  # --smoke: the same code path with the small model (CPU check of the script itself)


def slice_flops(cfg: ModelConfig) -> float:
    no_head = copy.deepcopy(cfg)
    no_head.text = dataclasses.replace(cfg.text, vocab_size=0)  # the slice has no output layer
    samples = [(SLICE["tokens_per_sample"], SLICE["tiles_per_sample"])] * SLICE["samples"]
    return step_flops(no_head, samples, TrainedParts()).total


def build_slice(cfg: ModelConfig):
    torch.manual_seed(0)
    model = build_model(cfg, DEVICE)
    model.lm_head = None  # unused by the slice; frees 0.57B parameters
    model.llm.embed_tokens.weight.requires_grad_(False)  # a lookup: no model FLOPs, not part of the slice
    return model


def time_steps(model, batch, ctx, warmup: int, iters: int) -> tuple[float, float]:
    """(seconds per forward+backward, seconds per fused AdamW step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_adamw(params, "auto", lr=1e-5, weight_decay=0.0)

    def fwd_bwd():
        with ctx():
            loss = slice_loss(model, batch)
        loss.backward()

    for _ in range(warmup):
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=False)
    synchronize()
    fb, st = 0.0, 0.0
    for _ in range(iters):
        t0 = time.perf_counter()
        fwd_bwd()
        synchronize()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=False)
        synchronize()
        fb, st = fb + t1 - t0, st + time.perf_counter() - t1
    return fb / iters, st / iters


def run_throughput_config(name: str, precision: str, compiled: bool, warmup: int, iters: int) -> dict:
    cfg = slice_config()
    model = build_slice(cfg)
    if precision.startswith("fp8"):
        recipe = precision.split("_", 1)[1]
        # All layers of the 2-layer slice in FP8 (the full model keeps its first/last layer in BF16).
        apply_fp8_training(model, FP8Config(enabled=True, recipe=recipe, bf16_llm_edge_layers=0), 2)
    t0 = time.monotonic()
    if compiled:
        compile_blocks(model)
    batch = packed_row(cfg, device=DEVICE, **SLICE)
    fb, opt = time_steps(model, batch, lambda: autocast(torch.bfloat16), warmup, iters)
    return {"name": name, "fwd_bwd_s": fb, "optim_s": opt, "setup_s": time.monotonic() - t0,
            "peak_mem_gib": peak_memory_gib()}  # fmt: skip


def run_te_config(name: str, fp8_recipe: str | None, warmup: int, iters: int) -> dict:
    from parallel.layers import TPInfo
    from parallel.te_backend import TELayerBackend, te_fp8_autocast
    from parallel.tensor_parallel import parallelize_model_tp

    cfg = slice_config()
    reference = build_slice(cfg)
    state = {k: v for k, v in reference.state_dict().items()}
    model = reference  # replace its linears/attention with TE modules, then load the same weights
    parallelize_model_tp(model, cfg, TPInfo(), TELayerBackend(), sequence_parallel=False)
    model.lm_head = None
    model.to(DEVICE)
    model.load_state_dict(state, strict=True)
    model.llm.embed_tokens.weight.requires_grad_(False)
    fp8 = FP8Config(enabled=fp8_recipe is not None, recipe=fp8_recipe or "delayed")

    @contextlib.contextmanager
    def ctx():
        with autocast(torch.bfloat16), te_fp8_autocast(fp8):
            yield

    batch = packed_row(cfg, device=DEVICE, **SLICE)
    fb, opt = time_steps(model, batch, ctx, warmup, iters)
    return {"name": name, "fwd_bwd_s": fb, "optim_s": opt, "setup_s": 0.0,
            "peak_mem_gib": peak_memory_gib()}  # fmt: skip


def peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0


# -- report ---------------------------------------------------------------------------------------------------
def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "torchao", "transformer_engine", "flash_attn"):
        if is_available(mod):
            try:
                out[mod] = getattr(__import__(mod), "__version__", "?")
            except Exception as exc:  # report, do not crash the benchmark
                out[mod] = f"import failed: {type(exc).__name__}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new configuration after this")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument(
        "--configs", default="bf16,bf16+compile,fp8_tensorwise,fp8_tensorwise+compile,fp8_rowwise+compile"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="small model on CPU: checks the script, not speed"
    )
    args = parser.parse_args()
    global DEVICE, SMOKE
    compile_ok = not args.smoke
    if args.smoke:
        DEVICE, SMOKE = "cpu", True
        SLICE.update(samples=2, tokens_per_sample=96, tiles_per_sample=1)
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu_bench.py needs a CUDA device (or --smoke for a CPU check of the script)")
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)"
    peak = peak_tflops_for(card)
    flops = slice_flops(slice_config())
    report = {"card": card, "date": datetime.date.today().isoformat(), "versions": versions(),
              "peak_bf16_tflops": peak, "slice_tflop_per_step": flops / 1e12, "rows": []}  # fmt: skip
    print(f"# {card}  peak {peak} TFLOP/s  versions {report['versions']}", flush=True)
    if not args.skip_parity:
        report["parity"] = run_parity(steps=2 if SMOKE else 8)
        p = report["parity"]
        print(f"# parity: bf16 vs fp32 {p['bf16_vs_fp32']:.2e} (<= 1e-2); fp8 tensorwise vs bf16 "
              f"{p['fp8_tensorwise_vs_bf16']:.2e}, rowwise {p['fp8_rowwise_vs_bf16']:.2e} (<= 5e-2): "
              f"{'PASS' if p['pass'] else 'FAIL'}", flush=True)  # fmt: skip
    plans = []
    for name in args.configs.split(","):
        precision, compiled = name.split("+")[0], name.endswith("+compile") and compile_ok
        name = name if compiled or not name.endswith("+compile") else name + "(smoke: eager)"
        plans.append(
            (
                name,
                lambda n=name, p=precision, c=compiled: run_throughput_config(
                    n, p, c, args.warmup, args.iters
                ),
            )
        )
    if is_available("transformer_engine"):
        plans.append(("te_bf16", lambda: run_te_config("te_bf16", None, args.warmup, args.iters)))
        plans.append(
            ("te_fp8_current", lambda: run_te_config("te_fp8_current", "current", args.warmup, args.iters))
        )
    for name, plan in plans:
        if time.monotonic() - START > args.budget_s:
            report["rows"].append({"name": name, "skipped": "time budget"})
            continue
        try:
            row = plan()
            row["tflops"] = flops / row["fwd_bwd_s"] / 1e12
            row["mfu"] = row["tflops"] / peak if peak else 0.0
        except Exception as exc:  # one failing configuration must not hide the others
            row = {"name": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        report["rows"].append(row)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(f"# {json.dumps(row)}", flush=True)
    print_table(report)
    print(json.dumps(summary(report)))


def summary(report: dict) -> dict:
    rows = {r["name"]: r for r in report["rows"] if "tflops" in r}
    best_bf16 = max((r["tflops"] for n, r in rows.items() if n.startswith("bf16")), default=0.0)
    best_fp8 = max((r["tflops"] for n, r in rows.items() if n.startswith("fp8")), default=0.0)
    return {**report, "bf16_mfu": best_bf16 / report["peak_bf16_tflops"] if report["peak_bf16_tflops"] else 0.0,
            "fp8_speedup_vs_bf16": best_fp8 / best_bf16 if best_bf16 else 0.0,
            "elapsed_s": time.monotonic() - START}  # fmt: skip


def print_table(report: dict) -> None:
    tokens, tiles = (
        SLICE["samples"] * SLICE["tokens_per_sample"],
        SLICE["samples"] * SLICE["tiles_per_sample"],
    )
    what = "small model (smoke)" if SMOKE else "2 InternViT-6B + 2 InternLM2-20B layers"
    print(f"\nslice: {what}, {tokens} tokens, {tiles} tiles, tp1 on {report['card']}; "
          f"{report['slice_tflop_per_step']:.1f} TFLOP per fwd+bwd")  # fmt: skip
    print(
        f"{'config':<26}{'fwd+bwd ms':>12}{'TFLOP/s':>10}{'MFU':>8}{'AdamW ms':>10}{'mem GiB':>9}{'setup s':>9}"
    )
    for r in report["rows"]:
        if "tflops" not in r:
            print(f"{r['name']:<26}  {r.get('error') or r.get('skipped')}")
            continue
        print(f"{r['name']:<26}{r['fwd_bwd_s'] * 1e3:>12.1f}{r['tflops']:>10.1f}{r['mfu'] * 100:>7.1f}%"
              f"{r['optim_s'] * 1e3:>10.1f}{r['peak_mem_gib']:>9.1f}{r['setup_s']:>9.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
