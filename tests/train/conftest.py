"""Session-wide spawned rank groups for the trainer scenarios (see ``scenarios.py``).

Each group runs all its scenarios once, in order, the first time a test asks for it; the scenarios' own tests
then only inspect what was written and returned.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # spawned workers import the scenario modules by name
sys.path.insert(0, str(HERE.parent / "parallel"))  # the shared rank launcher

from launcher import run_on_ranks  # noqa: E402
from scenarios import run_scenarios  # noqa: E402

N = 3  # steps per half of the resume scenarios

WORLD2 = [
    ("tp2", "test_resume:straight_vs_resumed", (["parallel.tp=2"],)),
    ("layout_change", "test_resume:tp2_then_dp2", ()),
    ("nonfinite", "test_resume:nonfinite", ()),
    ("zero_dp2", "test_resume:sharded_optimizer_runs", ()),
    ("reshard", "test_sharded_checkpoint:tp2_checkpoint_into_other_layouts", ()),
    ("export", "test_export:train_tp2_for_export", ()),
    ("fp8", "test_fast_path:fp8_vs_fp32", ()),
    ("layout_invariance", "test_layout_invariance:on_two_ranks", ()),
    ("lora_export", "test_lora_export:train_lora_tp2", ()),
    ("family_twins", "test_family_twins:import_train_one_step", ()),
    ("fsdp_resume", "test_fsdp_train:dp_shard_resume", ()),
    ("finetune_flows", "test_finetune_flow:finetune_flows", ()),
    ("frozen_bf16", "test_finetune_flow:frozen_in_bf16", ()),
    ("planner_memory", "test_fsdp_train:measured_vs_planned", ()),
]
WORLD4 = [
    ("tp2xpp2", "test_resume:straight_vs_resumed", (["parallel.tp=2", "parallel.pp=2"],)),
    ("zero_tp2xdp2", "test_resume:straight_run", (["parallel.tp=2", "parallel.shard_optimizer=true"],)),
    ("invariance_tp2xpp2", "test_layout_invariance:steps_at", (["parallel.tp=2", "parallel.pp=2"],)),
]


def _group(tmp_path_factory, world: int, scenarios: list) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp(f"world{world}")
    return root, run_on_ranks(run_scenarios, world, str(root), scenarios, timeout=900.0)


@pytest.fixture(scope="session")
def world2(tmp_path_factory):
    return _group(tmp_path_factory, 2, WORLD2)


@pytest.fixture(scope="session")
def world4(tmp_path_factory):
    return _group(tmp_path_factory, 4, WORLD4)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small synthetic dataset + tokenizer written by ``python -m mllm.data synth`` (as a user would)."""
    import os
    import subprocess

    out = tmp_path_factory.mktemp("synth")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mllm.data", "synth", str(out), "--num-samples", "300"]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return out
