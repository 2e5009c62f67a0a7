"""A user's run through the command line, as subprocesses with stdout piped (no terminal), on synthetic data:

- the console (banner, a line every ``logging.print_every`` steps with every field, the end summary), whose
  numbers are metrics.jsonl's;
- validation (``eval.*``): ``val_loss`` in metrics.jsonl, TensorBoard (on by default) and the console, the
  same value on 1 rank and on 2 data-parallel ranks;
- run directories: a second start without ``checkpoint.resume`` refuses in one final line and loses nothing;
  a resume appends to metrics.jsonl;
- failures end with one ``error:`` line (data quality), other ranks' warnings carry ``[rank N]``;
- exports and chat: ``mllm-convert export-hf`` writes a processor that AutoProcessor + generate use without
  hand-written tokens, and ``mllm-chat`` answers; both equal our own model's greedy decode on training's
  tokenization and tiling.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllm.train.checkpoint import latest_checkpoint
from mllm.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
HAVE_WANDB = importlib.util.find_spec("wandb") is not None
pytest.importorskip("transformers")

STEPS = 4
# A learning rate so small that the weights stay at their (seeded) initialization: the validation loss of a
# 1-rank and a 2-rank run must then agree whatever data each trained on.
COMMON = ["optim.lr=1e-9", "checkpoint.every=2", "logging.print_every=2", "eval.every=2", "eval.batches=3"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _train(cwd: Path, args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "mllm.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "-m", "mllm.train"]
    return subprocess.run(
        [*cmd, "--config-name=tiny_sft", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def _data_args(data: Path) -> list[str]:
    return [
        f"data.path={data}/meta.json",
        f"data.tokenizer={data}/tokenizer",
        f"eval.data_path={data}/meta.json",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("user_run")
    subprocess.run(
        [sys.executable, "-m", "mllm.data", "synth", "data", "--num-samples", "120"],
        cwd=work,
        env=_env(),
        check=True,
        capture_output=True,
    )
    data = work / "data"
    base = _data_args(data) + COMMON
    first = _train(work, [*base, "train.run_dir=run", f"train.steps={STEPS}"])
    metrics_after_first = (work / "run" / "metrics.jsonl").read_text()
    again = _train(work, [*base, "train.run_dir=run", f"train.steps={STEPS}"])
    metrics_after_refusal = (work / "run" / "metrics.jsonl").read_text()
    wandb = ["logging.wandb=true", "logging.wandb_mode=offline"] if HAVE_WANDB else []
    resumed = _train(
        work, [*base, "train.run_dir=run", f"train.steps={STEPS + 2}", "checkpoint.resume=auto", *wandb]
    )
    dp2 = _train(work, [*base, "train.run_dir=run_dp2", "train.steps=2"], nproc=2)
    return {
        "work": work,
        "data": data,
        "first": first,
        "again": again,
        "resumed": resumed,
        "dp2": dp2,
        "metrics_after_first": metrics_after_first,
        "metrics_after_refusal": metrics_after_refusal,
    }


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_console_banner_step_lines_and_summary_without_a_terminal(runs):
    proc = runs["first"]
    _ok(proc)
    out = proc.stdout.splitlines()
    assert out[0].startswith("mllm train | tiny_sft | tp1 x pp1 x dp1 = 1 ranks on cpu")
    assert any(line.strip().startswith(f"data {runs['data']}/meta.json") for line in out)
    assert any("fresh start at step 0" in line for line in out)
    assert any("MFU n/a" in line and "logging.peak_tflops" in line for line in out)  # why MFU is 0 on CPU
    records = {r["step"]: r for r in read_metrics(runs["work"] / "run" / "metrics.jsonl") if "loss" in r}
    step_lines = [line for line in out if re.match(r"step \d+/\d+ \| loss", line)]
    assert [line.split()[1] for line in step_lines] == [f"2/{STEPS}", f"4/{STEPS}"]  # every 2 steps
    for line in step_lines:
        fields = dict(part.split(" ", 1) for part in line.split(" | ") if part.count(" ") >= 1)
        step = int(line.split()[1].split("/")[0])
        assert float(fields["loss"]) == pytest.approx(records[step]["loss"], abs=1e-4)
        assert float(fields["lr"]) == pytest.approx(records[step]["lr"], rel=1e-2)
        assert float(fields["grad"]) == pytest.approx(records[step]["grad_norm"], abs=1e-3)
        for unit in ("tok/s", "tiles/s", "MFU n/a", "mem ", "GiB", "ETA "):
            assert unit in line, (unit, line)
    summary = out[-1]
    assert summary.startswith(f"finished at step {STEPS} |") and "tok/s mean" in summary
    assert f"loss {records[1]['loss']:.4f} -> {records[STEPS]['loss']:.4f}" in summary


def test_validation_loss_in_metrics_tensorboard_console_and_layout_independent(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _ok(runs["first"])
    _ok(runs["dp2"])
    run_dir = runs["work"] / "run"
    val = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in val][:2] == [2, 4]
    first = val[0]
    per_dataset = {k: v for k, v in first.items() if k.startswith("val_loss/")}
    # every dataset of the synthetic meta (captions in two languages and text-only chat) has held-out rows
    datasets = json.loads((runs["data"] / "meta.json").read_text())
    assert set(datasets) == {"synth_en", "synth_zh", "synth_text"}
    assert set(per_dataset) == {f"val_loss/{name}" for name in datasets}
    assert min(per_dataset.values()) <= first["val_loss"] <= max(per_dataset.values())
    assert f"step 2/{STEPS} | val_loss {first['val_loss']:.4f}" in runs["first"].stdout
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert "train/loss" in events.Tags()["scalars"]  # TensorBoard is on in tiny_sft
    tb = {e.step: e.value for e in events.Scalars("val_loss")}
    assert tb[2] == pytest.approx(first["val_loss"], rel=1e-6)
    # 2 data-parallel ranks split the 3 held-out micro-batches (one rank gets a loss-free pad): same value
    dp2 = [r for r in read_metrics(runs["work"] / "run_dp2" / "metrics.jsonl") if "val_loss" in r]
    assert dp2[0]["step"] == 2
    assert dp2[0]["val_loss"] == pytest.approx(first["val_loss"], abs=1e-5)
    assert dp2[0]["val_loss/synth_zh"] == pytest.approx(first["val_loss/synth_zh"], abs=1e-5)
    assert "mllm train | tiny_sft | tp1 x pp1 x dp2 = 2 ranks" in runs["dp2"].stdout
    # per-dataset bad-sample counts ride along with every step record
    assert set(read_metrics(run_dir / "metrics.jsonl")[0]["bad_samples_per_dataset"]) == set(datasets)


def test_run_dir_with_checkpoints_refuses_a_fresh_start_and_resume_appends(runs):
    again = runs["again"]
    assert again.returncode == 2
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "checkpoint.resume=auto" in last and "train.run_dir" in last
    assert "Traceback" not in again.stderr
    assert runs["metrics_after_refusal"] == runs["metrics_after_first"]  # nothing written, nothing lost
    _ok(runs["resumed"])
    text = (runs["work"] / "run" / "metrics.jsonl").read_text()
    assert text.startswith(runs["metrics_after_first"])  # appended, never truncated
    steps = [r["step"] for r in read_metrics(runs["work"] / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 3))
    assert f"resumed from run/checkpoints/step_{STEPS:08d} at step {STEPS}" in runs["resumed"].stdout


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb not installed (pip install 'mllm[wandb]')")
def test_wandb_offline_run_records_the_metrics(runs):
    _ok(runs["resumed"])  # ran with logging.wandb=true logging.wandb_mode=offline, no network
    logs = list((runs["work"] / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    data = logs[0].read_bytes()
    assert b"train/loss" in data and b"val_loss" in data and b"tiny_sft" in data


def test_data_quality_failure_ends_with_one_error_line(runs, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(runs["data"], bad)
    for image in (bad / "images").iterdir():
        image.write_bytes(b"not an image")
    proc = _train(
        tmp_path, [*_data_args(bad), "train.run_dir=r", "train.steps=2", "data.min_samples_for_bad_check=10"]
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: DataQualityError: dataset 'synth_") and "max_bad_fraction" in last
    assert "Traceback" not in proc.stderr


def test_other_ranks_warnings_carry_their_rank():
    code = (
        "import logging, warnings\n"
        "from mllm.train.console import prefix_rank_output\n"
        "prefix_rank_output(3)\n"
        "warnings.warn('careful')\n"
        "logging.getLogger('mllm.data').warning('skipped sample k')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("  ")]
    assert lines and all(line.startswith("[rank 3] ") for line in lines), proc.stderr


# -- exports a user can run, and chat -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def export(runs, tmp_path_factory):
    _ok(runs["first"])
    out = tmp_path_factory.mktemp("export") / "hf"
    ckpt = latest_checkpoint(runs["work"] / "run" / "checkpoints")  # what mllm-chat RUN_DIR picks
    subprocess.run(
        [sys.executable, "-m", "mllm.convert", "export-hf", str(ckpt), str(out), "--format", "transformers"],
        env=_env(),
        check=True,
        capture_output=True,
    )
    return ckpt, out


def _question(data: Path) -> tuple[Path, str]:
    meta = json.loads((data / "meta.json").read_text())["synth_en"]
    for line in (data / "synth_en.jsonl").read_text().splitlines():
        record = json.loads(line)
        if isinstance(record.get("image"), str):
            return data / meta["root"] / record["image"], record["conversations"][0]["value"].split("\n")[-1]
    raise AssertionError("no single-image sample")


@torch.no_grad()
def _our_greedy(ckpt: Path, input_ids: torch.Tensor, pixel_values: torch.Tensor, end_id: int, n: int) -> list:
    """Greedy decoding with our own model (no KV cache: the whole sequence every step)."""
    import mllm.hf

    model = mllm.hf.load(ckpt)
    ids = input_ids
    new: list[int] = []
    for _ in range(n):
        logits = model(ids, pixel_values, segment_ids=torch.ones_like(ids)).logits
        token = int(logits[0, -1].argmax())
        new.append(token)
        if token == end_id:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def test_export_runs_with_autoprocessor_and_generate_like_our_model(runs, export):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from mllm.chat import transformers_processor
    from mllm.data.batch import normalize_pixels
    from mllm.data.conversation import ConversationTokenizer
    from mllm.data.templates import get_template
    from mllm.data.tiling import decode_tiles

    ckpt, hf_dir = export
    image, question = _question(runs["data"])
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == end_id
    processor = transformers_processor(hf_dir)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": Image.open(image)}, {"type": "text", "text": question}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    # training's tokenization and tiling (tiny_sft: 1..4 tiles of 56 px, 4 tokens each) give the same inputs
    tiles = decode_tiles(image.read_bytes(), 1, 4, 56, True, False)
    conv = ConversationTokenizer(tokenizer, get_template("internlm2-chat"), 4)
    prompt = conv.generation_prompt([{"from": "human", "value": "<image>\n" + question}], [len(tiles)])
    ours = torch.from_numpy(prompt)[None]
    assert torch.equal(inputs["input_ids"], ours)
    assert torch.equal(inputs["pixel_values"], normalize_pixels(torch.from_numpy(tiles)))
    model = AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    theirs = out[0, ours.shape[1] :].tolist()
    assert theirs == _our_greedy(ckpt, ours, inputs["pixel_values"], end_id, 6)
    assert (len(theirs) == 6) or theirs[-1] == end_id  # generate stops at <|im_end|>


def test_mllm_chat_answers_like_our_model(runs, export):
    from transformers import AutoTokenizer

    ckpt, hf_dir = export
    image, question = _question(runs["data"])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mllm.chat",
            str(runs["work"] / "run"),
            "--image",
            str(image),
            question,
            "--max-new-tokens",
            "6",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the reference: transformers generate on the export, prompt built by the export's processor
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from mllm.chat import transformers_processor

    processor = transformers_processor(hf_dir)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": Image.open(image)}, {"type": "text", "text": question}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    model = AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = AutoTokenizer.from_pretrained(hf_dir).decode(
        out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert proc.stdout.strip() == expected.strip()
    # interactive: questions from stdin, one answer line each
    proc = subprocess.run(
        [sys.executable, "-m", "mllm.chat", str(ckpt), "--image", str(image), "--max-new-tokens", "6"],
        env=_env(),
        input=f"{question}\n/quit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[1].strip() == expected.strip()


def test_progress_bar_on_a_terminal_keeps_the_step_lines():
    """On a terminal (a pty here) rank 0 adds a rich progress bar; the step lines are still printed above it."""
    import pty

    code = (
        "from mllm.train.console import Console\n"
        "c = Console(True, 4, 0, 2, 'auto')\n"
        "for s in range(1, 5):\n"
        "    c.step(dict(step=s, loss=1.0 / s, lr=1e-3, grad_norm=1.0, tokens_per_s=100.0, tiles=4,\n"
        "                step_time=0.1, mfu=0.0, peak_mem=0.1))\n"
        "c.close()\n"
    )
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the pty
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "step 2/4 | loss 0.5000" in text and "step 4/4 | loss 0.2500" in text
    assert "4/4" in text and "\x1b[" in text  # the bar: rich's completed count, drawn with escape codes
