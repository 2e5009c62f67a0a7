"""Synthetic dataset, tokenizer and the command line."""

from __future__ import annotations

import filecmp
import json

from transformers import AutoTokenizer

from mllm.data.__main__ import main
from mllm.data.sources import load_meta
from mllm.data.synth import SPECIAL_TOKENS, synth


def test_synth_is_deterministic_and_complete(synth_dir, tmp_path):
    again = synth(tmp_path, num_samples=400, seed=1, progress=False)
    for name in ("synth_en.jsonl", "synth_zh.jsonl", "synth_text.jsonl", "meta.json"):
        assert filecmp.cmp(synth_dir.out_dir / name, tmp_path / name, shallow=False)
    assert filecmp.cmp(
        synth_dir.tokenizer / "tokenizer.json", again.tokenizer / "tokenizer.json", shallow=False
    )
    specs = {s.name: s for s in load_meta(synth_dir.meta)}
    assert set(specs) == {"synth_en", "synth_zh", "synth_text"} and specs["synth_text"].repeat_time == 0.5
    sizes = set()
    from PIL import Image

    for line in (synth_dir.out_dir / "synth_en.jsonl").read_text().splitlines()[:30]:
        rec = json.loads(line)
        for name in [rec["image"]] if isinstance(rec["image"], str) else rec["image"]:
            sizes.add(Image.open(synth_dir.out_dir / "images" / name).size)
    assert all(64 <= w <= 700 and 64 <= h <= 700 for w, h in sizes) and len(sizes) > 20


def test_answers_depend_on_the_image(synth_dir):
    zh = [json.loads(x) for x in (synth_dir.out_dir / "synth_zh.jsonl").read_text().splitlines()]
    en = [json.loads(x) for x in (synth_dir.out_dir / "synth_en.jsonl").read_text().splitlines()]
    colour_answers = {
        t["value"]
        for r in en
        for t in r["conversations"]
        if t["value"].startswith("The ") and " is " in t["value"]
    }
    assert len(colour_answers) > 5  # many different answers to the same kind of question
    assert any("红色" in t["value"] for r in zh for t in r["conversations"])


def test_tokenizer_is_small_with_special_tokens_and_chinese(synth_dir):
    tok = AutoTokenizer.from_pretrained(str(synth_dir.tokenizer))
    assert tok.is_fast and len(tok) == synth_dir.vocab_size <= 1000
    assert json.loads((synth_dir.out_dir / "info.json").read_text())["vocab_size"] == len(tok)
    for t in SPECIAL_TOKENS:
        assert (
            tok.convert_tokens_to_ids(t) != tok.unk_token_id
            and len(tok(t, add_special_tokens=False).input_ids) == 1
        )
    text = "图中的圆形是什么颜色？ The circle is red."
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.bos_token_id is not None and tok.pad_token_id is not None and tok.eos_token_id is not None


def test_cli_prepare_and_errors(synth_dir, tmp_path, capsys):
    assert main(["prepare", str(synth_dir.meta), str(tmp_path / "out"), "--shard-size", "100"]) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert sum(e["length"] for e in index["datasets"].values()) == synth_dir.num_samples
    assert all(len(e["shards"]) == -(-e["length"] // 100) for e in index["datasets"].values())
    (tmp_path / "bad.json").write_text(json.dumps({"x": {"root": "."}}))
    assert main(["prepare", str(tmp_path / "bad.json"), str(tmp_path / "o2")]) == 2
    assert "'annotation'" in capsys.readouterr().err
