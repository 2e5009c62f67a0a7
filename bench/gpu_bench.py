"""Single-GPU benchmark of the fast path (run by bench/gpu.sh; needs only torch, Triton, torchao and this repo).

Steps, in this order (the ones that matter first, so that a run cut short still has them):

1. Throughput of a full-width slice, compiled BF16 then compiled FP8 (tensorwise): 2 InternViT-6B layers +
   projector + 2 InternLM2-20B layers, one packed row of 8192 tokens (4 samples of 2048 tokens, 2 tiles each
   = 8 tiles), tp1, BF16 autocast with fp32 master weights. Forward + backward timed (the output head is left
   out: in a 2-layer slice a 92k-vocab head would be ~40% of the FLOPs, in the real 48-layer model ~3%); the
   fused AdamW step timed separately. FLOPs from ``mllm.train.flops`` with causal attention counted as the
   triangle computed; MFU of forward+backward and of the whole step (with AdamW), against the card's dense
   BF16 peak for every row (FP8 rows too, and they say so).
2. The same eager (BF16, FP8), then parity on a small model: 8 AdamW steps in fp32 (reference), BF16 autocast
   and BF16 + FP8 (torchao), same init and batch; the largest relative loss difference per step. Pass: BF16
   <= 1e-2 of fp32, FP8 <= 5e-2 of BF16. Then compiled FP8 rowwise.
3. With Transformer Engine importable: the slice through ``parallel.layer_backend=te`` (BF16, FP8 current).
4. The trainer on the GPU for 20 steps (``gpu_trainer_smoke``: FlexAttention, FP8, fused AdamW, async
   checkpoint and resume) against the same steps on the CPU in fp32.

Each step runs in its own try/except; each finished row is appended to ``$OUT/gpu_bench_rows.jsonl`` at once;
the table and the summary JSON line (last line) are printed at the end or on SIGTERM/SIGINT
(``gpu_report``). ``--budget-s``: no benchmark step starts after that many seconds; ``--trainer-smoke-by-s``:
the same for the trainer smoke. Setup time (build, FP8 conversion, compile, warm-up) and peak memory (stats
reset before each step) are per step; timed iterations are not part of setup.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import glob
import os
import signal
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_report, gpu_trainer_smoke
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this repo

from gpu_report import Report, add_rates  # noqa: E402

from mllm.kernels.compile import compile_blocks  # noqa: E402
from mllm.kernels.deps import is_available  # noqa: E402
from mllm.kernels.fp8 import FP8Config, apply_fp8_training  # noqa: E402
from mllm.kernels.optim import build_adamw  # noqa: E402
from mllm.model import build_model  # noqa: E402
from mllm.model.config import ModelConfig, TextConfig, VisionConfig, internvl_chat_v1_5  # noqa: E402
from mllm.train.flops import TrainedParts, peak_tflops_for, step_flops  # noqa: E402

# The time budget counts from gpu.sh's start (BENCH_T0): interpreter start-up and imports are inside it.
T0 = float(os.environ.get("BENCH_T0") or time.time())
DEVICE = "cuda"
SMOKE = False  # --smoke: the same code path with the small model on CPU (a check of the script itself)
SLICE = {"samples": 4, "tokens_per_sample": 2048, "tiles_per_sample": 2}  # 8192 tokens, 8 tiles
DEFAULT_STEPS = "bf16+compile,fp8_tensorwise+compile,bf16,fp8_tensorwise,parity,fp8_rowwise+compile"
WHEELS = Path(__file__).resolve().parent / "wheels"


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
    """fp32 vs BF16 vs BF16 + FP8 (tensorwise, rowwise) losses of the small model; see the module docstring."""
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


def slice_flops(cfg: ModelConfig) -> float:
    """Model FLOPs of one forward+backward of the slice: no output layer, causal attention as computed."""
    no_head = copy.deepcopy(cfg)
    no_head.text = dataclasses.replace(cfg.text, vocab_size=0)
    samples = [(SLICE["tokens_per_sample"], SLICE["tiles_per_sample"])] * SLICE["samples"]
    return step_flops(no_head, samples, TrainedParts(), causal_triangle=True).total


def build_slice(cfg: ModelConfig):
    torch.manual_seed(0)
    model = build_model(cfg, DEVICE)
    model.lm_head = None  # unused by the slice; frees 0.57B parameters
    model.llm.embed_tokens.weight.requires_grad_(False)  # a lookup: no model FLOPs, not part of the slice
    return model


def free_device_memory() -> None:
    """Drop the previous step's graphs and cached blocks, then reset the peak: each step's peak is its own."""
    gc.collect()
    torch._dynamo.reset()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def allocated_gib(peak: bool = False) -> float:
    if DEVICE != "cuda":
        return 0.0
    return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**30


class Steps:
    """Forward+backward (under ``ctx``) and the fused AdamW step of the slice, timed separately."""

    def __init__(self, model, batch, ctx) -> None:
        self.model, self.batch, self.ctx = model, batch, ctx
        self.opt = build_adamw([p for p in model.parameters() if p.requires_grad], "auto", lr=1e-5)

    def fwd_bwd(self) -> None:
        with self.ctx():
            loss = slice_loss(self.model, self.batch)
        loss.backward()

    def opt_step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)

    def warmup(self, n: int) -> None:
        for _ in range(n):
            self.fwd_bwd()
            self.opt_step()
        synchronize()

    def timed(self, iters: int) -> tuple[float, float]:
        """(seconds per forward+backward, seconds per AdamW step), averaged over ``iters``."""
        fb = st = 0.0
        for _ in range(iters):
            t0 = time.perf_counter()
            self.fwd_bwd()
            synchronize()
            t1 = time.perf_counter()
            self.opt_step()
            synchronize()
            fb, st = fb + t1 - t0, st + time.perf_counter() - t1
        return fb / iters, st / iters


def measure(name: str, precision: str, compile_: bool, make_model, ctx, args) -> dict:
    """Build (``make_model``), warm up (compiles), then time; setup and peak memory are this step's own."""
    before = allocated_gib()  # after run_step's free_device_memory(): what earlier steps left behind
    t0 = time.perf_counter()
    cfg = slice_config()
    model = make_model(cfg)
    batch = packed_row(cfg, device=DEVICE, **SLICE)
    inject(args, name)  # test hook (--inject): fail or get SIGTERM mid-step
    steps = Steps(model, batch, ctx)
    steps.warmup(args.warmup)
    setup_s = time.perf_counter() - t0
    fb, opt = steps.timed(args.iters)
    return {"name": name, "precision": precision, "compile": compile_, "fwd_bwd_s": fb, "optim_s": opt,
            "setup_s": setup_s, "peak_mem_gib": allocated_gib(peak=True), "mem_before_gib": before}  # fmt: skip


def run_throughput_config(name: str, args) -> dict:
    precision, compile_ = name.split("+")[0], name.endswith("+compile")
    compiled = compile_ and not SMOKE  # smoke: the same steps, eager (CPU inductor would dominate the check)

    def make_model(cfg):
        model = build_slice(cfg)
        if precision.startswith("fp8"):
            # All layers of the 2-layer slice in FP8 (the full model keeps its first/last layer in BF16).
            recipe = precision.split("_", 1)[1]
            apply_fp8_training(model, FP8Config(enabled=True, recipe=recipe, bf16_llm_edge_layers=0), 2)
        if compiled:
            compile_blocks(model)
        return model

    row = measure(name, precision, compile_, make_model, lambda: autocast(torch.bfloat16), args)
    row["compiled"] = compiled
    return row


def run_te_config(name: str, fp8_recipe: str | None, args) -> dict:
    from parallel.layers import TPInfo
    from parallel.te_backend import TELayerBackend, te_fp8_autocast
    from parallel.tensor_parallel import parallelize_model_tp

    def make_model(cfg):
        model = build_slice(cfg)
        state = dict(model.state_dict())
        # Replace its linears/attention with TE modules, then load the same weights.
        parallelize_model_tp(model, cfg, TPInfo(), TELayerBackend(), sequence_parallel=False)
        model.lm_head = None
        model.to(DEVICE)
        model.load_state_dict(state, strict=True)
        model.llm.embed_tokens.weight.requires_grad_(False)
        return model

    fp8 = FP8Config(enabled=fp8_recipe is not None, recipe=fp8_recipe or "delayed")

    @contextlib.contextmanager
    def ctx():
        with autocast(torch.bfloat16), te_fp8_autocast(fp8):
            yield

    row = measure(name, f"fp8_{fp8_recipe}" if fp8_recipe else "bf16", False, make_model, ctx, args)
    row.update(compiled=False, backend="te")
    return row


# -- set-up, plan and main -----------------------------------------------------------------------------------
def ensure_torchao() -> str:
    """Import torchao, or unpack the newest wheel in bench/wheels/ into a private folder (offline, nothing
    installed) and put it on sys.path. Returns what was done (the header line says it)."""
    try:
        import torchao.float8  # noqa: F401

        return "torchao importable"
    except ImportError:
        pass
    wheels = sorted(glob.glob(str(WHEELS / "torchao-*-py3-none-any.whl")))
    if not wheels:
        return "torchao missing and no wheel in bench/wheels: FP8 steps will fail"
    site = Path(tempfile.gettempdir()) / "mllm_gpu_site"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extractall(site)
    for mod in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        del sys.modules[mod]  # a broken installed torchao may have been half imported
    sys.path.insert(0, str(site))
    return f"torchao from {Path(wheels[-1]).name} (unpacked to {site})"


def inject(args, name: str) -> None:
    """Test hook: ``--inject NAME=error`` raises in step NAME, ``--inject NAME=sigterm`` signals this process."""
    what = dict(item.split("=", 1) for item in args.inject).get(name)
    if what == "error":
        raise RuntimeError(f"injected failure in {name}")
    if what == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at the next bytecode and exits; never returns here


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "torchao", "transformer_engine", "flash_attn"):
        if is_available(mod):
            try:
                out[mod] = getattr(__import__(mod), "__version__", "?")
            except Exception as exc:  # noqa: BLE001 - report, do not crash the benchmark
                out[mod] = f"import failed: {type(exc).__name__}"
    return out


def plan(args) -> list[tuple[str, str, object]]:
    """(name, kind, thunk) in run order; kind "row" (throughput), "section" (parity) or "smoke" (trainer)."""
    steps = []
    for name in filter(None, args.steps.split(",")):
        if name == "parity":
            steps.append((name, "section", lambda: run_parity(steps=2 if SMOKE else 8)))
        else:
            steps.append((name, "row", lambda n=name: run_throughput_config(n, args)))
    if is_available("transformer_engine"):
        steps.append(("te_bf16", "row", lambda: run_te_config("te_bf16", None, args)))
        steps.append(("te_fp8_current", "row", lambda: run_te_config("te_fp8_current", "current", args)))
    if args.trainer_steps > 0:

        def trainer_smoke():
            from gpu_trainer_smoke import run_trainer_smoke

            with tempfile.TemporaryDirectory(prefix="mllm_trainer_smoke_") as tmp:
                return run_trainer_smoke(DEVICE, args.trainer_steps, Path(tmp))

        steps.append(("trainer_smoke", "smoke", trainer_smoke))
    return steps


def run_step(report: Report, name: str, kind: str, thunk, args, meta: dict) -> None:
    start_by = args.trainer_smoke_by_s if kind == "smoke" else args.budget_s
    section = kind != "row"
    if report.elapsed() > start_by:
        skipped = {"skipped": f"time budget: {report.elapsed():.0f} s > {start_by:.0f} s"}
        report.add_section(name, skipped) if section else report.add_row({"name": name, **skipped})
        return
    report.current = (name, section)
    free_device_memory()
    try:
        if section:
            inject(args, name)  # rows inject mid-step, after their model is built (``measure``)
        result = thunk()
        if not section:
            add_rates(result, meta["slice_tflop_per_step"] * 1e12, meta["peak_bf16_tflops"])
    except Exception as exc:  # noqa: BLE001 - one failing step must not hide the others
        result = {"error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"}
        result = result if section else {"name": name, **result}
    report.current = None
    report.add_section(name, result) if section else report.add_row(result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=270.0, help="start no benchmark step after this")
    parser.add_argument("--trainer-smoke-by-s", type=float, default=330.0, help="start the trainer smoke by")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--steps", default=DEFAULT_STEPS, help="comma-separated steps, in run order")
    parser.add_argument("--trainer-steps", type=int, default=None, help="0: no trainer smoke (default 20)")
    parser.add_argument(
        "--smoke", action="store_true", help="small model on CPU: checks the script, not speed"
    )
    parser.add_argument("--inject", action="append", default=[], help="test hook: STEP=error|sigterm")
    args = parser.parse_args(argv)
    global DEVICE, SMOKE
    if args.smoke:
        DEVICE, SMOKE = "cpu", True
        SLICE.update(samples=2, tokens_per_sample=96, tiles_per_sample=1)
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu_bench.py needs a CUDA device (or --smoke for a CPU check of the script)")
    if args.trainer_steps is None:
        args.trainer_steps = 4 if SMOKE else 20
    torchao_note = ensure_torchao()
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)"
    meta = {"card": card, "date": datetime.date.today().isoformat(), "versions": versions(),
            "peak_bf16_tflops": peak_tflops_for(card), "slice_tflop_per_step": slice_flops(slice_config()) / 1e12,
            "torchao_source": torchao_note}  # fmt: skip
    tokens, tiles = (
        SLICE["samples"] * SLICE["tokens_per_sample"],
        SLICE["samples"] * SLICE["tiles_per_sample"],
    )
    what = "small model (smoke)" if SMOKE else "2 InternViT-6B + 2 InternLM2-20B layers"
    report = Report(meta, f"{what}, {tokens} tokens, {tiles} tiles, tp1", start=T0)
    report.install_signal_handlers()
    print(
        f"# {card}  peak {meta['peak_bf16_tflops']} TFLOP/s  {meta['versions']}  ({torchao_note})", flush=True
    )
    print(f"# rows -> {report.rows_path}", flush=True)
    steps = plan(args)
    report.planned = [name for name, _, _ in steps]
    for name, kind, thunk in steps:
        run_step(report, name, kind, thunk, args, meta)
    report.finish()


if __name__ == "__main__":
    main()
