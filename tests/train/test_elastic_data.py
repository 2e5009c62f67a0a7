"""Resume with another data-parallel size on the real synthetic data: a dp2 run checkpoints, a dp1 run (tp2 on
the same 2 ranks) resumes from it, and the data stream continues instead of restarting (``mllm.data.elastic``).

The independent reference is a fresh dp1 ``PackedLoader`` on the same data: the resumed run's first step must
not be its first step, and no sample the dp2 run trained is trained again (the run stays inside the first
epoch).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch.distributed as dist
from scenarios import scenario_result

STEPS_BEFORE, STEPS_AFTER = 2, 2


class RecordingSource:
    """``DataLoaderSource`` that remembers the sample ids of every step it hands out."""

    def __init__(self, run, mesh) -> None:
        from mllm.train.data import DataLoaderSource

        self.inner = DataLoaderSource(run, mesh)
        self.steps: list[list[str]] = []

    def next_micro_batches(self, n: int):
        micro = self.inner.next_micro_batches(n)
        self.steps.append([i for mb in micro for i in mb["sample_ids"]])
        return micro

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _overrides(synth: Path, run_dir: Path, extra: list[str]) -> list[str]:
    return [
        f"data.path={synth / 'meta.json'}",
        f"data.tokenizer={synth / 'tokenizer'}",
        f"train.run_dir={run_dir}",
        "logging.progress=off",
        "optim.warmup_steps=1",
        *extra,
    ]


def _train(overrides: list[str]) -> tuple[dict, RecordingSource, str]:
    from mllm.config import load_run_config, validate_run_config
    from mllm.train.run import run_training

    run = load_run_config("tiny_sft", overrides)
    validate_run_config(run, dist.get_world_size())
    made: list[RecordingSource] = []

    def make(run, mesh):
        made.append(RecordingSource(run, mesh))
        return made[-1]

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = run_training(run, make)
    return result, made[0], out.getvalue()


def dp2_then_dp1(rank: int, world: int, root: str) -> dict:
    from mllm.data.synth import synth

    root_p = Path(root)
    data = root_p / "synth"
    if rank == 0:
        synth(data, num_samples=200, progress=False)
    dist.barrier()
    steps = STEPS_BEFORE + STEPS_AFTER
    _, before, _ = _train(
        _overrides(data, root_p / "dp2", [f"train.steps={steps}", f"train.stop_after={STEPS_BEFORE}"])
    )
    ckpt = root_p / "dp2" / "checkpoints" / f"step_{STEPS_BEFORE:08d}"
    result, after, printed = _train(
        _overrides(
            data, root_p / "dp1", ["parallel.tp=2", f"train.steps={steps}", f"checkpoint.resume={ckpt}"]
        )
    )
    summary = after.inner.elastic_summary
    return {
        "before": before.steps,
        "after": after.steps,
        "result": result,
        "printed": printed,
        "summary": None if summary is None else (summary.old_dp, summary.new_dp, summary.remaining),
    }


def test_dp2_checkpoint_resumes_at_dp1_continuing_the_data_stream(world2):
    from mllm.config import load_run_config
    from mllm.data.loader import PackedLoader

    directory, results = scenario_result(world2, "elastic_data")
    data = directory / "synth"
    for r in results:
        assert r["result"]["step"] == STEPS_BEFORE + STEPS_AFTER and not r["result"]["stopped"]
        assert r["summary"] is not None and r["summary"][:2] == (2, 1) and r["summary"][2] > 0
        assert len(r["after"]) == STEPS_AFTER
    assert results[0]["after"] == results[1]["after"]  # tp peers of one replica see the same batches
    assert "data stream resumed with dp 2 -> 1" in results[0]["printed"], results[0]["printed"]
    trained_before = {i for r in results for step in r["before"] for i in step}
    trained_after = [i for step in results[0]["after"] for i in step]
    assert trained_after and not trained_before & set(trained_after)  # none trained twice

    # The reference: a fresh dp1 stream of the same run starts elsewhere.
    run = load_run_config("tiny_sft", _overrides(data, directory / "ref", ["parallel.tp=2"]))
    loader = PackedLoader(run.data, 0, 1)
    grad_accum = run.train.global_batch_size // run.data.micro_batch_size
    fresh = [i for _ in range(grad_accum) for row in next(loader).sample_ids for i in row]
    loader.close()
    assert results[0]["after"][0] != fresh
