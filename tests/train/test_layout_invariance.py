"""Layout-invariant global batches on the real data pipeline, samples.jsonl, and training by epochs.

- The same 3 steps at 1 rank, dp2 and tp2 x pp2 train the same samples (samples.jsonl) with the same losses
  (fp32, 1e-5 relative); a run checkpointed at dp1 (tp2) and resumed at dp2 equals the straight run.
- `train.epochs=1` over a meta with repeat_time 2 and 0.5 trains exactly InternVL's epoch: the reference is
  InternVL's own repeat_time code (`LazySupervisedDataset.__init__` of internvl_chat_finetune.py, MIT licensed,
  copied below) applied to the annotation lines. With repeat_time 1, samples.jsonl lists every line exactly once,
  also when the epoch is interrupted mid-way and resumed under another layout.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch.distributed as dist
from scenarios import scenario_result

STEPS = 3
SYNTH_SAMPLES = 60


def internvl_raw_data(lines: list, repeat_time: float) -> list:
    """From OpenGVLab/InternVL internvl_chat/internvl/train/internvl_chat_finetune.py (MIT), verbatim logic."""
    raw_data = list(lines)
    if repeat_time < 1:
        # If repeat_time is less than 1, select a portion of the data
        raw_data = raw_data[: int(len(raw_data) * repeat_time)]
    if repeat_time > 1:
        assert isinstance(repeat_time, int)
        # Repeat the list if repeat_time is greater than 1
        raw_data = raw_data * repeat_time
    return raw_data


def _data(root: Path, rank: int) -> Path:
    """The synthetic data plus two metas: repeat_time 2 / 0.5, and one dataset at repeat_time 1."""
    data = root / "synth"
    if rank == 0:
        from mllm.data.synth import synth

        synth(data, num_samples=SYNTH_SAMPLES, progress=False)
        base = json.loads((data / "meta.json").read_text())
        repeat = {"synth_en": {**base["synth_en"], "repeat_time": 2}, "synth_text": base["synth_text"]}
        (data / "meta_repeat.json").write_text(json.dumps(repeat))
        (data / "meta_once.json").write_text(json.dumps({"synth_zh": base["synth_zh"]}))
        # every third line of synth_zh unparsable: 33% rejected
        zh = (data / "synth_zh.jsonl").read_text().splitlines()
        bad = [line if i % 3 else "{not json" for i, line in enumerate(zh)]
        (data / "bad.jsonl").write_text("\n".join(bad) + "\n")
        (data / "meta_bad.json").write_text(
            json.dumps({"bad": {**base["synth_zh"], "annotation": "bad.jsonl"}})
        )
    if dist.is_initialized():
        dist.barrier()
    return data


def _train(data: Path, meta: str, run_dir: Path, extra: list[str]) -> dict:
    from mllm.config import load_run_config, validate_run_config
    from mllm.train.run import run_training

    overrides = [
        f"data.path={data / meta}",
        f"data.tokenizer={data / 'tokenizer'}",
        f"train.run_dir={run_dir}",
        "data.log_samples=true",
        "logging.progress=off",
        "optim.warmup_steps=1",
        "checkpoint.every=0",
        *extra,
    ]
    run = load_run_config("tiny_sft", overrides)
    validate_run_config(run, dist.get_world_size())
    return run_training(run)


def steps_at(rank: int, world: int, root: str, layout: list[str]) -> None:
    """A straight 3-step run in this layout (tp2 x pp2 on 4 ranks)."""
    root_p = Path(root)
    _train(_data(root_p, rank), "meta.json", root_p / "straight", [f"train.steps={STEPS}", *layout])


def on_two_ranks(rank: int, world: int, root: str) -> str:
    root_p = Path(root)
    data = _data(root_p, rank)
    _train(data, "meta.json", root_p / "dp2", [f"train.steps={STEPS}"])
    # dp1 (tp2) for one step, then dp2 from its checkpoint
    _train(
        data, "meta.json", root_p / "dp1_dp2", [f"train.steps={STEPS}", "train.stop_after=1", "parallel.tp=2"]
    )
    _train(data, "meta.json", root_p / "dp1_dp2", [f"train.steps={STEPS}", "checkpoint.resume=auto"])
    _train(data, "meta_repeat.json", root_p / "repeat", ["train.epochs=1"])
    # one epoch interrupted after 2 steps at dp2, finished at dp1 (tp2)
    _train(data, "meta_once.json", root_p / "once", ["train.epochs=1", "train.stop_after=2"])
    _train(
        data, "meta_once.json", root_p / "once", ["train.epochs=1", "parallel.tp=2", "checkpoint.resume=auto"]
    )
    return bad_data_fails_on_every_rank(data, root_p / "bad")


def bad_data_fails_on_every_rank(data: Path, run_dir: Path) -> str:
    from mllm.data.badsamples import DataQualityError

    rule = ["data.max_bad_fraction=0.2", "data.bad_window=12", "data.min_samples_for_bad_check=12"]
    try:
        _train(data, "meta_bad.json", run_dir, ["train.steps=20", *rule])
    except DataQualityError as e:
        return str(e)
    return "no error"


def one_rank(rank: int, world: int, root: str, data: str) -> None:
    _train(Path(data), "meta.json", Path(root) / "dp1", [f"train.steps={STEPS}"])


@pytest.fixture(scope="module")
def two_ranks(world2):
    return scenario_result(world2, "layout_invariance")[0]


def test_too_many_bad_samples_stop_every_rank_with_one_line(world2):
    """The rule is global: both ranks raise the same one-line error at the same step (no rank hangs in a
    collective); a third of the lines are unparsable, more than the 20% allowed in a window of 12."""
    _, messages = scenario_result(world2, "layout_invariance")
    assert messages[0] == messages[1] and "\n" not in messages[0]
    assert "dataset 'bad'" in messages[0] and "of its last 12 samples rejected" in messages[0], messages[0]
    assert "bad_annotation" in messages[0] and "data.max_bad_fraction" in messages[0]


@pytest.fixture(scope="module")
def single_rank(two_ranks):
    """The 1-rank reference on the same data files (a spawned process of its own)."""
    from launcher import run_on_ranks

    run_on_ranks(one_rank, 1, str(two_ranks), str(two_ranks / "synth"), timeout=600.0)
    return two_ranks / "dp1"


def _losses(run_dir: Path) -> list[float]:
    from mllm.train.metrics import read_metrics

    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def _samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_every_layout_trains_the_same_global_batches(two_ranks, single_rank, world4):
    four = scenario_result(world4, "invariance_tp2xpp2")[0] / "straight"
    runs = {"dp1": single_rank, "dp2": two_ranks / "dp2", "tp2xpp2": four, "dp1->dp2": two_ranks / "dp1_dp2"}
    reference = _samples(single_rank)
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert all(r["samples"] and all(":" in s for s in r["samples"]) for r in reference)
    ref_losses = _losses(single_rank)
    assert len(ref_losses) == STEPS
    for name, run_dir in runs.items():
        assert _samples(run_dir) == reference, name
        assert _losses(run_dir) == pytest.approx(ref_losses, rel=1e-5), name


def _trained(run_dir: Path) -> Counter:
    lines = _samples(run_dir)
    assert [r["step"] for r in lines] == list(range(1, len(lines) + 1))
    assert (run_dir / "DONE").read_text().strip() == str(len(lines))  # the derived step count was trained
    return Counter(s for r in lines for s in r["samples"])


def test_one_epoch_follows_internvl_repeat_time(two_ranks):
    data = two_ranks / "synth"
    meta = json.loads((data / "meta_repeat.json").read_text())
    expected: Counter = Counter()
    for name, entry in meta.items():
        n = len((data / entry["annotation"]).read_text().splitlines())
        repeat = entry["repeat_time"]
        expected.update(f"{name}:{i}" for i in internvl_raw_data(range(n), repeat))
    assert meta["synth_en"]["repeat_time"] == 2 and meta["synth_text"]["repeat_time"] == 0.5
    assert _trained(two_ranks / "repeat") == expected


def test_an_interrupted_epoch_trains_every_line_once(two_ranks):
    data = two_ranks / "synth"
    n = len((data / "synth_zh.jsonl").read_text().splitlines())
    trained = _trained(two_ranks / "once")
    assert trained == Counter(f"synth_zh:{i}" for i in range(n))
    assert (two_ranks / "once" / "checkpoints" / "step_00000002").is_dir()  # it was resumed mid-epoch
