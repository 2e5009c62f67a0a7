"""Remote storage end to end against a real S3-compatible server (moto's, started here on 127.0.0.1), and the
resolution of relative paths in a meta JSON (InternVL's working-directory rule first)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import small_config
from test_data_video import write_mp4

from mllm.data import build_loader
from mllm.data.__main__ import main
from mllm.data.sources import load_meta
from mllm.data.synth import synth

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "mllm-test"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on a free loopback port; the AWS environment points s3fs (and child processes) at it."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).mkdir(BUCKET)
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def remote_data(s3_env, tmp_path_factory):
    """A small synthetic dataset plus a video dataset, uploaded; the meta's roots/annotations are relative,
    except the video root, an absolute s3:// URL."""
    import fsspec

    local = synth(tmp_path_factory.mktemp("remote"), num_samples=40, seed=3, progress=False)
    write_mp4(local.out_dir / "images" / "clip.mp4")
    q = [{"from": "human", "value": "What grows?"}, {"from": "gpt", "value": "A bar."}]
    (local.out_dir / "clips.jsonl").write_text(json.dumps({"video": "clip.mp4", "conversations": q}) + "\n")
    meta = json.loads(local.meta.read_text())
    meta["clips"] = {"root": f"s3://{BUCKET}/raw/images", "annotation": "clips.jsonl", "repeat_time": 1}
    local.meta.write_text(json.dumps(meta))
    fs = fsspec.filesystem("s3")
    for path in local.out_dir.rglob("*"):
        if path.is_file() and "tokenizer" not in path.parts:
            fs.put_file(str(path), f"{BUCKET}/raw/{path.relative_to(local.out_dir).as_posix()}")
    local_meta = local.out_dir / "meta_local.json"  # the same data read from disk, for comparison
    on_disk = {"root": str(local.out_dir / "images")}
    local_meta.write_text(
        json.dumps(
            {k: {**v, **on_disk, "annotation": str(local.out_dir / v["annotation"])} for k, v in meta.items()}
        )
    )
    return local, local_meta, f"s3://{BUCKET}/raw/meta.json"


def first_batches(cfg, n=3):
    loader = build_loader(cfg)
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    loader.close()
    return out, loader.bad_samples.counts()


def assert_same_batches(a, b):
    for x, y in zip(a, b):
        assert x.sample_ids == y.sample_ids
        assert np.array_equal(x.input_ids.numpy(), y.input_ids.numpy())
        assert np.array_equal(x.pixel_values.numpy(), y.pixel_values.numpy())


def test_meta_on_s3_reads_exactly_like_local_files(remote_data):
    local, local_meta, url = remote_data
    specs = {s.name: s for s in load_meta(url)}
    assert specs["clips"].root == f"s3://{BUCKET}/raw/images"  # not mangled into a local path
    assert (
        specs["synth_en"].annotation == f"s3://{BUCKET}/raw/synth_en.jsonl"
    )  # relative to the meta's folder
    # two loader workers: s3fs clients must survive the fork
    remote, bad = first_batches(
        small_config(url, local.tokenizer, min_num_frame=2, max_num_frame=3, num_workers=2)
    )
    ours, _ = first_batches(small_config(local_meta, local.tokenizer, min_num_frame=2, max_num_frame=3))
    assert not bad and sum(int(b.pixel_values.shape[0]) for b in remote) > 0
    assert_same_batches(remote, ours)


def test_prepare_to_s3_then_train_from_s3_shards(remote_data, s3_env, tmp_path, capsys):
    local, local_meta, url = remote_data
    shards = f"s3://{BUCKET}/shards"
    assert main(["prepare", url, shards, "--shard-size", "16"]) == 0
    assert "clips: 1 samples in 1 shards" in capsys.readouterr().out
    assert main(["prepare", str(local_meta), str(tmp_path / "shards"), "--shard-size", "16"]) == 0
    cfg = dict(min_num_frame=2, max_num_frame=3)
    remote, bad = first_batches(small_config(shards, local.tokenizer, **cfg))
    assert not bad
    assert_same_batches(remote, first_batches(small_config(tmp_path / "shards", local.tokenizer, **cfg))[0])
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "mllm.train", "--config-name=tiny_sft", f"data.path={shards}",
        f"data.tokenizer={local.tokenizer}", "train.steps=2", f"train.run_dir={run_dir}", "checkpoint.every=0",
        "checkpoint.save_final=false", "logging.progress=off", "data.min_num_frame=2", "data.max_num_frame=3",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, cwd=ROOT, env={**env, **s3_env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(
        s["tiles"] > 0 and s["bad_samples"] == s["truncated_samples"] == 0 for s in steps
    )


def test_relative_paths_working_directory_first_then_meta_folder(synth_dir, tmp_path, monkeypatch):
    # InternVL's own metas name paths relative to the folder training starts in.
    data = tmp_path / "repo" / "data"
    shutil.copytree(synth_dir.out_dir / "images", data / "images")
    shutil.copy(synth_dir.out_dir / "synth_en.jsonl", data / "en.jsonl")
    metas = tmp_path / "repo" / "metas"
    metas.mkdir()
    meta = {"en": {"root": "data/images", "annotation": "data/en.jsonl", "repeat_time": 1}}
    (metas / "internvl.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path / "repo")
    (spec,) = load_meta(metas / "internvl.json")
    assert (spec.root, spec.annotation) == (str(data / "images"), str(data / "en.jsonl"))
    monkeypatch.chdir(tmp_path)  # now only the meta's folder could hold them: it does not
    with pytest.raises(ValueError) as e:
        load_meta(metas / "internvl.json")
    assert str(tmp_path / "data" / "en.jsonl") in str(e.value)
    assert str(metas / "data" / "en.jsonl") in str(e.value) and "'en'" in str(e.value)
