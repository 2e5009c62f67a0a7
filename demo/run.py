"""``make demo``: the whole job on CPU in a few minutes.

1. synthetic data (``python -m mllm.data synth``), 2. ``tiny_sft`` on 4 ranks (tp2 x pp2) under torchrun,
3. a second torchrun that resumes from the checkpoint and trains a few more steps, 4. export of the last
checkpoint to the transformers format, 5. transformers loads it (logits checked against our model) and answers a
question about a synthetic image. Ends with a summary table; exits 1 with a one-line reason on any failure.

``python -m demo [--steps 50] [--resume-steps 5] [--work-dir demo_out] [--num-samples 1000]``
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import mllm.hf
from demo.hf import (
    build_question,
    load_checkpoint_model,
    our_logits,
    processor_chat,
    transformers_answer,
    transformers_logits,
)
from demo.train import (
    RECIPE,
    DemoError,
    RunResult,
    check_losses,
    checkpoint_step,
    recipe_overrides,
    run_synth,
    run_torchrun,
    torchrun_command,
)
from mllm.config import load_run_config
from mllm.convert.processor import ImageSettings
from mllm.data.templates import get_template

TP, PP = 2, 2
LOGITS_TOLERANCE = 1e-4


@dataclass
class DemoOptions:
    steps: int = 50
    resume_steps: int = 5
    work_dir: Path = Path("demo_out")
    num_samples: int = 1000


@dataclass
class DemoResult:
    data_dir: Path
    run_dir: Path
    hf_dir: Path
    train: RunResult
    resumed: RunResult
    checkpoint_step: int  # the checkpoint the second run resumed from
    question: str
    expected: str
    answer: str
    new_tokens: int
    logits_max_diff: float  # exported transformers model vs our model loaded from the checkpoint
    seconds: float


def run_demo(opts: DemoOptions, say: Callable[[str], None] = print) -> DemoResult:
    """Run every step; raises DemoError (one line) when one fails."""
    t0 = time.perf_counter()
    work = opts.work_dir.resolve()
    data_dir, run_dir, hf_dir = work / "data", work / "run", work / "transformers"
    for old in (data_dir, run_dir, hf_dir):  # a fresh run every time (only the folders the demo writes)
        shutil.rmtree(old, ignore_errors=True)
    every = max(1, opts.steps // 2)
    loss_every = max(1, opts.steps // 10)
    total = opts.steps + opts.resume_steps

    say(f"[1/5] synthetic data: {opts.num_samples} samples -> {data_dir}")
    run_synth(data_dir, opts.num_samples)

    base = recipe_overrides(data_dir, run_dir, TP, PP) + [
        f"checkpoint.every={every}",
        "logging.progress=off",
        f"logging.print_every={total}",  # the demo prints its own loss lines
    ]
    cmd = torchrun_command(TP * PP, base + [f"train.steps={opts.steps}"])
    say(f"[2/5] train {RECIPE} on {TP * PP} CPU ranks (tp{TP} x pp{PP}), {opts.steps} steps -> {run_dir}")
    say("  $ " + _shown(cmd))
    train = run_torchrun(cmd, run_dir, opts.steps, say, loss_every)
    check_losses(train.losses, "training run")
    if train.checkpoint is None or checkpoint_step(train.checkpoint) != opts.steps:
        raise DemoError(f"training run: no checkpoint of step {opts.steps} under {run_dir / 'checkpoints'}")
    saved = checkpoint_step(train.checkpoint)
    say(f"  saved {train.checkpoint}")

    cmd = torchrun_command(TP * PP, base + [f"train.steps={total}", "checkpoint.resume=auto"])
    say(f"[3/5] resume from the step-{saved} checkpoint and train to step {total}")
    say("  $ " + _shown(cmd))
    resumed = run_torchrun(cmd, run_dir, total, say, loss_every, start_step=saved)
    check_losses(resumed.losses, "resumed run")
    if resumed.resumed_from_step != saved or resumed.records[0]["step"] != saved + 1:
        raise DemoError(
            f"resumed run: expected to continue from step {saved}, it reported {resumed.resumed_from_step} "
            f"and logged step {resumed.records[0]['step']} first"
        )
    if resumed.checkpoint is None or checkpoint_step(resumed.checkpoint) != total:
        raise DemoError(f"resumed run: no checkpoint of step {total} under {run_dir / 'checkpoints'}")

    say(f"[4/5] export {resumed.checkpoint.name} to the transformers format -> {hf_dir}")
    answer = _export_and_ask(resumed.checkpoint, data_dir, run_dir, hf_dir, say)
    return DemoResult(
        data_dir, run_dir, hf_dir, train, resumed, saved, **answer, seconds=time.perf_counter() - t0
    )


def _export_and_ask(
    ckpt: Path, data_dir: Path, run_dir: Path, hf_dir: Path, say: Callable[[str], None]
) -> dict:
    """Export, load with transformers, check its logits against ours, ask one question."""
    run = load_run_config(RECIPE, recipe_overrides(data_dir, run_dir, TP, PP))
    ours = load_checkpoint_model(ckpt, run.model)  # the path from a DCP checkpoint to HF (demo.hf)
    image = ImageSettings(run.data.min_dynamic_patch, run.data.max_dynamic_patch)  # the processor tiles alike
    mllm.hf.save(ours, hf_dir, format="transformers", tokenizer_dir=run.data.tokenizer, image=image)
    try:
        from transformers import AutoModelForImageTextToText, AutoTokenizer
    except ImportError as e:
        raise DemoError(f"transformers is not installed ({e}); run `make install`") from None

    say("[5/5] load with transformers and ask about a synthetic image")
    hf_model = AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    q = build_question(data_dir, run.data)
    theirs = transformers_logits(hf_model, q.input_ids, q.pixel_values)
    diff = float((theirs - our_logits(ours, q.input_ids, q.pixel_values)).abs().max())
    if not diff <= LOGITS_TOLERANCE:
        raise DemoError(f"export: transformers' logits differ from ours by {diff:.3g} (> {LOGITS_TOLERANCE})")
    say(
        f"  {type(hf_model).__name__} loaded; logits on the prompt ({q.input_ids.shape[1]} tokens, "
        f"{len(q.pixel_values)} tiles) equal our model's: max abs diff {diff:.1e}"
    )
    end_token = get_template(run.data.template).sep.strip()
    answer, new_tokens = transformers_answer(hf_model, tokenizer, q, end_token)
    if new_tokens == 0:
        raise DemoError("transformers generate returned no tokens")
    say(f"  image    {q.image.relative_to(data_dir)} ({q.sample_id})")
    say(f"  question {q.question}")
    say(f"  expected {q.expected}")
    say(f"  model    {answer}")
    say("  chat through the export's own transformers processor (chat template, tiling, image tokens):")
    chat_answer, chat_ids = processor_chat(hf_dir, q.image, q.question)
    if not torch.equal(chat_ids, q.input_ids):
        raise DemoError("the export's processor builds another prompt than training's tokenization")
    say(f"  user     <image> {q.question}")
    say(f"  model    {chat_answer}")
    return {
        "question": q.question,
        "expected": q.expected,
        "answer": answer,
        "new_tokens": new_tokens,
        "logits_max_diff": diff,
    }


def _shown(cmd: list[str]) -> str:
    """The command as a user would type it (the interpreter's path shortened)."""
    return " ".join(["python", *cmd[1:]])


def summary(r: DemoResult) -> list[str]:
    first, last = r.train.losses[0], r.train.losses[-1]
    tail = r.train.losses[-5:]
    rows = [
        ("data", str(r.data_dir)),
        (
            "loss (run 1)",
            f"{first:.3f} at step 1 -> {last:.3f} at step {r.train.records[-1]['step']} "
            f"(mean of the last {len(tail)}: {sum(tail) / len(tail):.3f})",
        ),
        (
            "resume",
            f"from step {r.checkpoint_step} -> step {r.resumed.records[-1]['step']}, "
            f"loss {r.resumed.losses[-1]:.3f}",
        ),
        ("training time", f"{r.train.seconds:.0f} s + {r.resumed.seconds:.0f} s (resumed)"),
        ("export", f"{r.hf_dir} (logits vs ours: {r.logits_max_diff:.1e})"),
        ("question", r.question),
        ("expected", r.expected),
        ("transformers", repr(r.answer)),
        ("total time", f"{r.seconds:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 2 + max(len(v) for _, v in rows))
    return [rule, *(f"{k:<{width}}  {v}" for k, v in rows), rule]


def parse_args(argv: list[str] | None) -> DemoOptions:
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50, help="steps of the first run (default 50)")
    p.add_argument("--resume-steps", type=int, default=5, help="steps after resuming (default 5)")
    p.add_argument("--work-dir", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--num-samples", type=int, default=1000, help="synthetic samples (default 1000)")
    args = p.parse_args(argv)
    if args.steps < 2 or args.resume_steps < 1 or args.num_samples < 20:
        p.error("need --steps >= 2, --resume-steps >= 1 and --num-samples >= 20")
    return DemoOptions(args.steps, args.resume_steps, args.work_dir, args.num_samples)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        result = run_demo(opts, say=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - any failure ends the demo with one line naming it
        reason = str(e).splitlines()[0] if str(e) else ""
        if not isinstance(e, DemoError):
            reason = f"{type(e).__name__}: {reason}"
        print(f"demo failed: {reason}", file=sys.stderr)
        return 1
    for line in summary(result):
        print(line)
    print("demo: all steps passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
