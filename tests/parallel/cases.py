"""Worker functions for the distributed tests: run a layout and compare it with the single-device model.

Each rank builds the single-device reference itself (tiny model, seeded), loads its weights into the parallel
model, runs the same global batch (this dp rank's share), gathers full gradients and compares.
"""

from __future__ import annotations

import functools

import torch

from mllm.model.config import tiny
from mllm.model.internvl import build_model
from mllm.model.lora import LoraConfig, freeze_adapted_parts, is_adapter_name
from mllm.model.loss import IGNORE_INDEX, reference_loss
from parallel import ParallelConfig, build_mesh, build_optimizer, parallelize
from parallel.build import is_frozen_name
from parallel.fsdp import full_tp_local, is_sharded
from parallel.optim import param_groups

SEQ = 16


# A tensor whose reference norm is below this is judged by absolute error: gradients that are mathematically
# zero (k_proj.bias: softmax ignores a shift shared by all keys) come out as ~1e-13 fp32 noise, whose relative
# error is meaningless. With GRAD_TOL 1e-5 this accepts an absolute error of 1e-11 on such tensors.
ABS_FLOOR = 1e-6


def model_config(
    vocab_size: int = 1024,
    vision_heads: int = 3,
    vision_style: str = "6b",
    text_arch: str = "internlm2",
    lora: dict | None = None,
):
    """tiny(): 6B-style ViT (RMSNorm, QK-norm) or 300M-style ("300m": LayerNorm, qkv bias, no QK-norm);
    InternLM2 text or Qwen3 ("qwen3": per-head q/k norms, head_dim 24 apart from 64 / 4 heads); LoRA."""
    cfg = tiny(vocab_size=vocab_size)
    cfg.vision.num_heads = vision_heads
    if vision_style == "300m":
        cfg.vision.norm_type, cfg.vision.qkv_bias, cfg.vision.qk_norm = "layer_norm", True, False
    if text_arch == "qwen3":
        cfg.text.arch, cfg.text.qk_norm, cfg.text.head_dim = "qwen3", True, 24
    if lora:
        cfg.lora = LoraConfig(**lora)
    return cfg


def _sample(gen, cfg, n_tiles: int, length: int) -> tuple[list[int], list[int]]:
    """One sample: a few text tokens, n_tiles * num_image_token image tokens, then text; labels shifted."""
    img = [cfg.image_token_id] * (n_tiles * cfg.num_image_token)
    n_text = length - len(img)
    text = torch.randint(0, cfg.image_token_id, (n_text,), generator=gen).tolist()
    ids = text[:2] + img + text[2:]
    labels = torch.randint(0, min(cfg.text.vocab_size, 1000), (length,), generator=gen).tolist()
    labels = [
        IGNORE_INDEX if t == cfg.image_token_id or i < 2 else lab
        for i, (t, lab) in enumerate(zip(ids, labels))
    ]
    return ids, labels


def make_micro_batches(cfg, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """n micro-batches [2, SEQ]: row 0 packs an image sample and a text-only sample; row 1 one 2-tile sample.
    Every odd micro-batch is text-only with one dummy tile (image_flags 0)."""
    gen = torch.Generator().manual_seed(seed)
    tile = cfg.vision.image_size
    out = []
    for i in range(n):
        text_only = i % 2 == 1
        rows = [[(0 if text_only else 1, 9), (0, 5)], [(0 if text_only else 2, 14)]]
        ids = torch.zeros(2, SEQ, dtype=torch.long)
        labels = torch.full((2, SEQ), IGNORE_INDEX)
        seg = torch.zeros(2, SEQ, dtype=torch.long)
        n_tiles = 0
        for r, samples in enumerate(rows):
            pos = 0
            for s, (tiles, length) in enumerate(samples, start=1):
                sid, slab = _sample(gen, cfg, tiles, length)
                ids[r, pos : pos + length] = torch.tensor(sid)
                labels[r, pos : pos + length] = torch.tensor(slab)
                seg[r, pos : pos + length] = s
                pos += length
                n_tiles += tiles
        flags = torch.ones(max(n_tiles, 1), dtype=torch.long)
        if n_tiles == 0:
            flags[:] = 0
        pixels = torch.randn(max(n_tiles, 1), 3, tile, tile, generator=gen)
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "segment_ids": seg,
                "pixel_values": pixels,
                "image_flags": flags,
            }
        )
    return out


def reference(cfg, pcfg: ParallelConfig, micro_batches, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(not is_frozen_name(name, pcfg))
    freeze_adapted_parts(model, cfg.lora)
    with torch.no_grad():  # a fresh adapter has B = 0 (A's gradient would be 0): make both matter
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.05)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / max(||b||, ABS_FLOOR)."""
    diff = (a.float() - b.float()).norm()
    return float(diff / max(float(b.float().norm()), ABS_FLOOR))


def compare_grads(rank: int, world: int, cfg_kwargs: dict, pcfg_kwargs: dict, n_micro: int = 2) -> dict:
    """Loss and every gradient vs the single device; returns errors (every rank computes the same)."""
    cfg = model_config(**cfg_kwargs)
    pcfg = ParallelConfig(**pcfg_kwargs)
    mesh = build_mesh(pcfg)
    all_mbs = make_micro_batches(cfg, n_micro * mesh.dp, seed=1)
    ref = reference(cfg, pcfg, all_mbs)
    ref_loss = reference_loss(ref, all_mbs, pcfg.loss_mode)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    pm = parallelize(cfg, pcfg, mesh, "cpu", init_state_dict=ref.state_dict())
    local = all_mbs[mesh.dp_rank * n_micro : (mesh.dp_rank + 1) * n_micro]
    seen_seq: list[int] = []
    for first_layer in list(pm.module.llm.layers.values())[:1]:  # a ViT-only pipeline rank has none
        first_layer.register_forward_hook(lambda m, args, out: seen_seq.append(args[0].shape[1]))
    result = pm.forward_backward(local)
    grads = pm.full_grads(all_stages=True)
    frozen_with_grad = [n for n, p in pm.named_parameters() if not p.requires_grad and p.grad is not None]
    errs = {n: rel_err(grads[n], g) for n, g in ref_grads.items() if n in grads}
    worst = max(errs, key=errs.get)
    return {
        "loss_err": abs(float(result.loss) - ref_loss.item()) / abs(ref_loss.item()),
        "grad_err": errs[worst],
        "worst": worst,
        "missing": sorted(set(ref_grads) - set(grads)),
        "extra": sorted(set(grads) - set(ref_grads)),
        "frozen_with_grad": frozen_with_grad,
        "num_grads": len(errs),
        "fsdp_params": sum(is_sharded(p) for _, p in pm.named_parameters()),
        "top": [(n, round(e, 3)) for n, e in errs.items() if e > 1e-5],
        "num_tokens": result.num_tokens,
        "llm_seq_per_rank": seen_seq[0] if seen_seq else None,
        "ref_tokens": int(sum((mb["labels"] != IGNORE_INDEX).sum() for mb in all_mbs)),
    }


def compare_adamw(rank: int, world: int, cfg_kwargs: dict, pcfg_kwargs: dict, steps: int = 3) -> dict:
    """Three AdamW steps (with global-norm clipping) vs the single device; also dummy-head zeros."""
    cfg = model_config(**cfg_kwargs)
    pcfg = ParallelConfig(**pcfg_kwargs)
    mesh = build_mesh(pcfg)
    n_micro, lr, wd, clip = 2, 1e-3, 0.1, 0.05
    ref = reference(cfg, pcfg, None)
    init = {n: t.clone() for n, t in ref.state_dict().items()}
    pm = parallelize(cfg, pcfg, mesh, "cpu", init_state_dict=init)
    ref_opt = torch.optim.AdamW(param_groups(ref.named_parameters(), wd), lr=lr)
    opt = build_optimizer(pm, lr=lr, weight_decay=wd)
    norm_errs = []
    for step in range(steps):
        all_mbs = make_micro_batches(cfg, n_micro * mesh.dp, seed=10 + step)
        ref_opt.zero_grad()
        reference_loss(ref, all_mbs, pcfg.loss_mode).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad], clip)
        ref_opt.step()
        pm.zero_grad()
        pm.forward_backward(all_mbs[mesh.dp_rank * n_micro : (mesh.dp_rank + 1) * n_micro])
        norm = pm.clip_grad_norm_(clip)
        opt.step()
        norm_errs.append(rel_err(norm, ref_norm))
    full = pm.full_state_dict(all_stages=True)
    ref_sd = ref.state_dict()
    # Adam divides by sqrt(v): entries whose gradient is ~eps amplify fp32 summation-order noise, so the
    # per-tensor relative error of the *update* (theta_3 - theta_0) is the robust comparison.
    update_errs = {n: rel_err(full[n] - init[n], ref_sd[n] - init[n]) for n in full}
    diffs = {n: float((full[n] - ref_sd[n]).abs().max()) for n in full}
    dummy_max = _dummy_head_max(pm)
    return {
        "changed": sorted(n for n in full if not torch.equal(full[n], init[n])),
        "num_adapters": sum(is_adapter_name(n) for n in full),
        "update_rel_err": max(update_errs.values()),
        "worst_update": max(update_errs, key=update_errs.get),
        "param_max_abs_err": max(diffs.values()),
        "norm_err": max(norm_errs),
        "num_params": len(full),
        "missing": sorted(set(ref_sd) - set(full)),
        "dummy_max": dummy_max,
        "sharded": type(opt).__name__,
    }


def _dummy_head_max(pm) -> float:
    """Largest magnitude found in padding entries of local shards (must stay exactly 0)."""
    worst = 0.0
    for name, p in pm.named_parameters():
        spec = pm.specs.get(name)
        mask = spec.real_mask(pm.tp) if spec is not None else None
        if mask is None:
            continue
        pad = full_tp_local(p.detach()).index_select(spec.dim, (~mask).nonzero().flatten())
        if pad.numel():
            worst = max(worst, float(pad.abs().max()))
    return worst


KINDS = {
    "grads": compare_grads,
    "grads_4mb": functools.partial(compare_grads, n_micro=4),  # pp 4 needs 4 micro-batches
    "adamw": compare_adamw,
}


def run_cases(rank: int, world: int, cases: list[tuple[str, str, dict, dict]]) -> dict[str, object]:
    """Several layouts in one process group (one spawn): {case name: result dict or error text}."""
    import traceback

    out: dict[str, object] = {}
    for name, kind, cfg_kwargs, pcfg_kwargs in cases:
        try:
            out[name] = KINDS[kind](rank, world, cfg_kwargs, pcfg_kwargs)
        except Exception:  # one failing layout must not hide the others' results
            out[name] = traceback.format_exc()
    return out
