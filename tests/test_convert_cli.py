"""``python -m mllm.convert`` end to end through subprocesses: import-hf, then a sharded export-hf."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.hf_fixtures import IM_END_ID, sample_batch, save_hf_model, tiny_hf_model, write_internvl_chat_dir

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "mllm.convert", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_import_then_sharded_export(tmp_path) -> None:
    from transformers import AutoModelForImageTextToText

    hf_model = tiny_hf_model("6b", "qwen2", seed=4)
    src = save_hf_model(hf_model, tmp_path / "hf")
    r = run_cli("import-hf", str(src), str(tmp_path / "native"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "native" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "native" / "config.json").read_text())["mllm_format"] == "mllm-native"

    out = tmp_path / "out"
    r = run_cli(
        "export-hf",
        str(tmp_path / "native"),
        str(out),
        "--format",
        "transformers",
        "--max-shard-size",
        "40KB",
    )
    assert r.returncode == 0, r.stderr

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    total = 0
    for shard in shards:
        tensors = load_file(str(shard))
        assert all(index["weight_map"][k] == shard.name for k in tensors)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    original = load_file(str(src / "model.safetensors"))
    assert set(index["weight_map"]) == set(original)

    loaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    batch = sample_batch(seed=6)
    with torch.no_grad():
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        assert torch.equal(loaded(**kw).logits, hf_model(**kw).logits)
    assert (out / "tokenizer_config.json").is_file() and (out / "tokenizer.model").is_file()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == IM_END_ID


def test_cli_export_v1_to_transformers_fails_clearly(tmp_path) -> None:
    src = write_internvl_chat_dir(tmp_path / "chat", ps_version="v1")
    assert run_cli("import-hf", str(src), str(tmp_path / "native")).returncode == 0
    r = run_cli("export-hf", str(tmp_path / "native"), str(tmp_path / "out"), "--format", "transformers")
    assert r.returncode == 2
    assert (
        "ps_version 'v1'" in r.stderr
        and "pixel shuffle v2" in r.stderr
        and "--format internvl_chat" in r.stderr
    )
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
