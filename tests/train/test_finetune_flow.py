"""The "2nd finetune" flows end to end on their tiny twins (``tiny_finetune``, ``tiny_finetune_lora``), at 2 ranks:
a released-style InternVL-Chat directory (random weights, written here) is imported, fine-tuned for one epoch of a
small custom meta JSON with the layout chosen by ``parallel.layout=auto``, and the trainer checkpoint is exported to
the InternVL-Chat format (LoRA merged) and to the transformers format; both reload with the trained model's logits.

References: the imported weights are the ones written; the trained model is the tp/dp-sharded weights the trainer
held in memory after its last step (gathered from the live ranks, not via the checkpoint); the epoch is the
annotation lines of the meta (repeat_time 1: each exactly once, in ``samples.jsonl``).

Also: ``parallel.frozen_dtype=compute`` holds frozen weights in bf16 on the real trainer model (also under FSDP2 with
fp32 LoRA adapters in the same units) and the planner counts exactly the bytes the model holds.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from scenarios import portable, restored, scenario_result

import mllm.hf
from demo.hf import our_logits, transformers_logits
from mllm.convert import core
from mllm.model.internvl import build_model
from mllm.model.lora import is_adapter_name

FLOWS = {"full": "tiny_finetune", "lora": "tiny_finetune_lora"}
SYNTH_SAMPLES = 24
IMAGE_TOKEN = 7  # <IMG_CONTEXT> of the synthetic tokenizer (tiny_sft's model.image_token_id)


def _released(cfg) -> dict[str, torch.Tensor]:
    """Random weights for every tensor (norm weights around 1), so parity checks can fail."""
    gen = torch.Generator().manual_seed(16)
    sd = {}
    for key, t in build_model(cfg).state_dict().items():
        noise = torch.randn(t.shape, generator=gen) * 0.05
        sd[key] = noise + (1.0 if "norm" in key and key.endswith("weight") else 0.0)
    return sd


def _prepare(root: Path) -> tuple[Path, Path]:
    """(custom meta JSON, imported checkpoint): synthetic data, a meta of two of its datasets at repeat_time 1,
    and the released-style InternVL-Chat directory (with the data's tokenizer) imported to our format."""
    from mllm.config import load_run_config
    from mllm.data.synth import synth

    info = synth(root / "data", num_samples=SYNTH_SAMPLES, progress=False)
    base = json.loads(info.meta.read_text())
    meta = {"my_captions": base["synth_en"], "my_chat": {**base["synth_text"], "repeat_time": 1}}
    (root / "data" / "my_meta.json").write_text(json.dumps(meta))
    cfg = load_run_config("tiny_finetune", []).model
    core.write_hf(_released(cfg), cfg, root / "released", "internvl_chat", tokenizer_dir=info.tokenizer)
    core.import_hf(root / "released", root / "imported")
    return root / "data" / "my_meta.json", root / "imported"


def finetune_flows(rank: int, world: int, root: str) -> dict:
    import torch.distributed as dist

    from mllm.config import load_run_config, validate_run_config
    from mllm.train.plan_report import resolve_auto_layout
    from mllm.train.run import default_batches
    from mllm.train.trainer import Trainer

    root_p = Path(root)
    if rank == 0:
        _prepare(root_p)
    dist.barrier()
    out = {}
    for flow, recipe in FLOWS.items():
        run = load_run_config(
            recipe,
            [
                f"model.init_from={root_p / 'imported'}",
                f"data.path={root_p / 'data' / 'my_meta.json'}",
                f"data.tokenizer={root_p / 'imported'}",  # the released checkpoint's tokenizer, as users do
                f"train.run_dir={root_p / flow}",
                "data.log_samples=true",
                "logging.progress=off",
                "checkpoint.every=0",
                "train.global_batch_size=2",  # a few steps per epoch of the small meta
                "optim.warmup_steps=1",
            ],
        )
        chosen = resolve_auto_layout(run, world)
        validate_run_config(run, world)
        trainer = Trainer(run, default_batches)
        trainer.fit()
        trained = portable(trainer.pm.full_state_dict(all_stages=True))
        if rank == 0:
            out[flow] = {"state_dict": trained, "model": run.model, "steps": run.train.steps,
                         "layout": chosen.layout()}  # fmt: skip
    return out


def frozen_in_bf16(rank: int, world: int, root: str) -> dict:
    """The tiny LoRA twin's model built as the trainer builds it with a bf16 compute dtype, at dp2, at dp_shard 2
    (FSDP2: frozen bf16 and trainable fp32 in one unit) and at pp2; one bf16 step each. Returns dtypes, the real local weight
    bytes and the planner's."""
    from fixtures import make_row

    from mllm.config import load_run_config
    from mllm.train.planner import rank_plans
    from parallel.mesh import build_mesh
    from parallel.model import parallelize

    out = {}
    for name, extra in {"dp2": [], "fsdp2": ["parallel.dp_shard=2"], "pp2": ["parallel.pp=2"]}.items():
        run = load_run_config(
            "tiny_finetune_lora",
            ["parallel.layout=manual", "train.dtype=bf16", "model.image_token_id=1000", *extra],
        )
        mesh = build_mesh(run.parallel, "cpu")
        pm = parallelize(run.model, run.parallel, mesh, "cpu", None, 0, compute_dtype=torch.bfloat16)
        dtypes = {n: str(p.dtype) for n, p in pm.named_parameters()}
        held = sum(
            p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in pm.module.parameters()
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            result = pm.forward_backward([make_row(0, mesh.dp_rank * 2 + i, 64) for i in range(2)])
        grads = {n: p.grad is not None for n, p in pm.named_parameters()}
        planned = rank_plans(run, run.parallel, world)[mesh.pp_rank].bytes["weights"]
        out[name] = {"dtypes": dtypes, "held": held, "planned": planned, "grads": grads,
                     "loss": float(result.loss)}  # fmt: skip
    return out


@pytest.fixture(scope="module")
def flows(world2):
    run_dir, (result, _) = scenario_result(world2, "finetune_flows")
    for value in result.values():
        value["state_dict"] = restored(value["state_dict"])
    return run_dir, result


def _question() -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt with one 56 px tile (4 image tokens) between text tokens of the synthetic vocabulary."""
    gen = torch.Generator().manual_seed(3)
    text = torch.randint(20, 900, (12,), generator=gen)
    ids = torch.cat([text[:3], torch.full((4,), IMAGE_TOKEN), text[3:]])[None]
    return ids, torch.randn(1, 3, 56, 56, generator=gen)


def test_one_epoch_of_the_custom_meta(flows):
    """Every annotation line of the meta trained exactly once; the schedule had exactly the epoch's steps."""
    from mllm.train.metrics import read_metrics

    run_dir, result = flows
    meta = json.loads((run_dir / "data" / "my_meta.json").read_text())
    lines = Counter()
    for ds, entry in meta.items():
        n = len((run_dir / "data" / entry["annotation"]).read_text().splitlines())
        lines.update(f"{ds}:{i}" for i in range(n))
    for flow in FLOWS:
        records = [json.loads(x) for x in (run_dir / flow / "samples.jsonl").read_text().splitlines()]
        assert Counter(s for r in records for s in r["samples"]) == lines
        steps = result[flow]["steps"]
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        assert len(read_metrics(run_dir / flow / "metrics.jsonl")) == steps


@pytest.mark.parametrize("flow", FLOWS)
def test_import_finetune_export_reload(flows, flow, tmp_path):
    transformers = pytest.importorskip("transformers")
    run_dir, result = flows
    cfg = result[flow]["model"]
    written = _released(dataclasses.replace(cfg, lora=type(cfg.lora)()))
    imported, _ = core.read_checkpoint(run_dir / "imported")
    assert imported.keys() == written.keys() and all(torch.equal(imported[k], v) for k, v in written.items())

    trained = result[flow]["state_dict"]
    moved = {k for k in written if not torch.equal(trained[k], written[k])}
    assert not any(k.startswith("vision.") for k in moved)  # the ViT is frozen in both flows
    if flow == "full":
        assert any(k.startswith("projector.") for k in moved) and any(k.startswith("llm.") for k in moved)
    else:
        assert not moved and cfg.lora.llm == 4
        assert any(is_adapter_name(k) and ".lora_B." in k and trained[k].abs().max() > 0 for k in trained)

    ckpt = run_dir / flow / "checkpoints" / f"step_{result[flow]['steps']:08d}"
    want = our_logits(mllm.hf.model_from_state_dict(trained, cfg).eval(), *_question())
    chat = core.export_hf(ckpt, tmp_path / "chat", "internvl_chat")
    chat_sd, chat_cfg = core.read_checkpoint(chat)
    assert not chat_cfg.lora.enabled and not any(is_adapter_name(k) for k in chat_sd)  # LoRA merged
    got = our_logits(mllm.hf.load(chat), *_question())
    tol = 0.0 if flow == "full" else 1e-4  # merging reorders the adapter's arithmetic
    assert (got - want).abs().max().item() <= tol
    native = core.export_hf(ckpt, tmp_path / "hf", "transformers")
    hf_model = transformers.AutoModelForImageTextToText.from_pretrained(native).eval()
    assert (transformers_logits(hf_model, *_question()) - want).abs().max().item() <= 1e-4


def test_auto_layout_was_chosen(flows):
    _, result = flows
    for flow in FLOWS:
        layout = result[flow]["layout"]
        assert layout["world"] == 2 and layout["tp"] * layout["pp"] * layout["dp"] == 2


def test_frozen_weights_held_in_bf16(world2):
    _, (result, _) = scenario_result(world2, "frozen_bf16")
    for name, r in result.items():
        frozen = {n: d for n, d in r["dtypes"].items() if not is_adapter_name(n)}
        assert frozen.pop("llm.embed_tokens.weight") == "torch.float32"  # starts the fp32 residual stream
        assert set(frozen.values()) == {"torch.bfloat16"}, name
        assert {d for n, d in r["dtypes"].items() if is_adapter_name(n)} == {"torch.float32"}
        assert all(r["grads"][n] == is_adapter_name(n) for n in r["dtypes"])
        # FSDP2 pads a dim-0 shard to equal rows; the planner divides exactly
        assert r["held"] == pytest.approx(r["planned"], rel=0.01 if name == "fsdp2" else 0.0), name
        assert r["loss"] == r["loss"] and r["loss"] > 0  # finite
