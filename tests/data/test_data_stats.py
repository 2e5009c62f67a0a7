"""`python -m mllm.data stats` (the data audit) and `prepare --check`."""

from __future__ import annotations

import json
import time

from test_data_bad_samples import write_bad_dataset

from mllm.data.__main__ import main


def run_cli(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_stats_on_the_synthetic_data(synth_dir, capsys):
    start = time.perf_counter()
    out = run_cli(
        capsys, "stats", str(synth_dir.meta), "--tokenizer", str(synth_dir.tokenizer),
        "--config-name", "tiny_sft", "--json",
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"stats took {elapsed:.1f} s"
    report = json.loads(out)
    meta = json.loads(synth_dir.meta.read_text())
    assert set(report["datasets"]) == set(meta)
    for name, d in report["datasets"].items():
        lines = (synth_dir.out_dir / meta[name]["annotation"]).read_text().splitlines()
        repeat = meta[name]["repeat_time"]  # InternVL: r < 1 keeps the first int(n * r) lines, r >= 1 repeats
        kept = [ln for ln in (lines[: int(len(lines) * repeat)] if repeat < 1 else lines) if ln.strip()]
        assert d["samples"] == len(kept)
        assert d["samples_per_epoch"] == len(kept) * max(1, int(repeat))
        assert d["accepted"] + sum(r["count"] for r in d["rejected"].values()) == len(kept)
        assert sum(d["tiles_hist"].values()) == sum(d["tokens_hist"].values()) == d["accepted"]
        assert sum(int(k) * v for k, v in d["tiles_hist"].items()) == d["tiles"]
        assert abs(d["image_token_fraction"] - d["tiles"] * 4 / d["tokens"]) < 1e-9  # tiny_sft: 4 per tile
    assert meta["synth_text"]["repeat_time"] == 0.5  # the rule above is exercised on a subset
    total = report["total"]
    assert total["samples_per_epoch"] == sum(d["samples_per_epoch"] for d in report["datasets"].values())
    assert total["steps_per_epoch"] == -(-total["rows_per_epoch"] // 4)  # tiny_sft: global batch 4 rows
    assert total["rows_per_epoch"] * 256 >= total["tokens_per_epoch"]
    human = run_cli(capsys, "stats", str(synth_dir.meta), "--tokenizer", str(synth_dir.tokenizer))
    assert "synth_en:" in human and "tiles per sample" in human and "steps per epoch" not in human


def test_stats_and_prepare_check_report_bad_samples(synth_dir, tmp_path, capsys):
    meta, n_good, n_bad = write_bad_dataset(synth_dir, tmp_path / "data")
    annotation = tmp_path / "data" / "bad.jsonl"  # an image value of the wrong type first: never read as text
    q = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    annotation.write_text(json.dumps({"image": 5, "conversations": q}) + "\n" + annotation.read_text())
    argv = [
        "stats",
        str(meta),
        "--tokenizer",
        str(synth_dir.tokenizer),
        "--config-name",
        "tiny_sft",
        "--json",
    ]
    report = json.loads(run_cli(capsys, *argv))  # tiny_sft: 256-token rows, so the long sample is too long
    mixed = report["datasets"]["mixed"]
    assert mixed["accepted"] == n_good + 1  # the truncated JPEG passes stage 1 (its header is fine)
    assert {
        "missing_image",
        "empty_conversation",
        "placeholder_mismatch",
        "too_long",
        "bad_annotation",
    } <= set(mixed["rejected"])
    assert "garbage.jpg" in mixed["rejected"]["corrupt_image"]["example"]
    assert "'image' is not a string or list" in mixed["rejected"]["bad_annotation"]["example"]
    out = run_cli(capsys, "prepare", str(meta), str(tmp_path / "shards"), "--check")
    assert "1 files missing, 2 unreadable" in out
    assert "truncated.jpg" in out and "garbage.jpg" in out
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["datasets"]["mixed"]["unreadable"]["count"] == 2
