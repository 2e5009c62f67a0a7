"""Lazy initial weights: a pipeline stage initialized from an HF checkpoint reads only its own tensors.

Every ``get_tensor`` of safetensors is counted while a pp=2 rank's model is materialized from
``load_initial_state`` (the trainer's path); the tensors read must be exactly the HF tensors of that stage's
parameters (chosen by HF name prefix here, independently of the mapping code), each read once, and the weights
must equal the eager full read of the checkpoint.
"""

from __future__ import annotations

import copy
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/hf_fixtures.py

from hf_fixtures import save_hf_model, tiny_hf_model, write_internvl_chat_dir  # noqa: E402

from mllm.convert import core, lazy  # noqa: E402
from mllm.convert.errors import CheckpointError  # noqa: E402
from parallel.build import build_rank_skeleton, materialize  # noqa: E402
from parallel.config import ParallelConfig  # noqa: E402
from parallel.mesh import ParallelMesh  # noqa: E402

# HF names of the last stage's parameters (LLM layer 1 of 2, final norm, output head) per layout.
LAST_STAGE = {
    "chat_internlm2": (
        "language_model.model.layers.1.",
        "language_model.model.norm.",
        "language_model.output.",
    ),
    "chat_llama": ("language_model.model.layers.1.", "language_model.model.norm.", "language_model.lm_head."),
    "transformers": (
        "language_model.model.layers.1.",
        "language_model.model.norm.",
        "language_model.lm_head.",
    ),
    "transformers_tied": (  # the head is the embedding
        "language_model.model.layers.1.",
        "language_model.model.norm.",
        "language_model.model.embed_tokens.",
    ),
}


def write_checkpoint(kind: str, out: Path) -> Path:
    if kind.startswith("chat_"):
        return write_internvl_chat_dir(out, text=kind.removeprefix("chat_"))
    return save_hf_model(tiny_hf_model(tie=kind == "transformers_tied"), out)


class CountingSafeOpen:
    """``safe_open`` that counts the tensors whose data is read."""

    def __init__(self) -> None:
        self.reads: Counter[str] = Counter()

    def __call__(self, path: str, framework: str):
        handle = safe_open(path, framework=framework)
        reads = self.reads

        class Counted:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return handle.keys()

            def get_slice(self, name):
                return handle.get_slice(name)

            def get_tensor(self, name):
                reads[name] += 1
                return handle.get_tensor(name)

        return Counted()


def _run_config(ckpt: Path, cfg):
    from mllm.config import load_run_config

    run = load_run_config("tiny_sft", ["data.path=unused"])
    run.model = copy.deepcopy(cfg)
    run.model.init_from = str(ckpt)
    return run


def _materialize_stage(cfg, init, pp_rank: int):
    pcfg = ParallelConfig(pp=2, layers_per_stage=[1, 1])
    mesh = ParallelMesh(device_mesh=None, tp=1, pp=2, dp=1, pp_rank=pp_rank)
    skeleton = build_rank_skeleton(cfg, pcfg, mesh)
    materialize(skeleton, cfg, torch.device("cpu"), init, seed=0)
    return dict(skeleton.module.named_parameters())


@pytest.mark.parametrize("kind", list(LAST_STAGE))
@pytest.mark.parametrize("pp_rank", [0, 1])
def test_stage_reads_only_its_tensors(kind, pp_rank, tmp_path, monkeypatch):
    from mllm.train.setup import load_initial_state

    ckpt = write_checkpoint(kind, tmp_path / kind)
    eager, cfg = core.read_checkpoint(ckpt)
    stored = list(load_file(str(ckpt / "model.safetensors")))
    last = {n for n in stored if n.startswith(LAST_STAGE[kind])}
    expected = last if pp_rank == 1 else set(stored) - last
    if kind == "transformers_tied" and pp_rank == 0:
        expected.add("language_model.model.embed_tokens.weight")  # stage 0's embedding too

    counter = CountingSafeOpen()
    monkeypatch.setattr(lazy, "safe_open", counter)
    init = load_initial_state(_run_config(ckpt, cfg))
    assert not counter.reads, "listing and checking the checkpoint must not read tensor data"
    params = _materialize_stage(cfg, init, pp_rank)

    assert set(counter.reads) == expected
    assert max(counter.reads.values()) == 1, counter.reads.most_common(3)  # a fused qkv is read once
    assert params and all(torch.equal(p, eager[name].float()) for name, p in params.items())


def test_lazy_and_eager_reads_agree(tmp_path):
    ckpt = write_checkpoint("chat_internlm2", tmp_path / "chat")
    eager, _ = core.read_checkpoint(ckpt)
    lazy_sd, _ = core.read_checkpoint(ckpt, lazy=True)
    assert isinstance(lazy_sd, lazy.LazyStateDict) and lazy_sd.keys() == eager.keys()
    for name, tensor in eager.items():
        assert lazy_sd.shape(name) == tuple(tensor.shape)
        assert torch.equal(lazy_sd[name], tensor), name


def test_native_checkpoint_is_lazy(tmp_path, monkeypatch):
    ckpt = write_checkpoint("transformers_tied", tmp_path / "hf")
    native = core.import_hf(ckpt, tmp_path / "native")
    eager, _ = core.read_checkpoint(native)
    counter = CountingSafeOpen()
    monkeypatch.setattr(lazy, "safe_open", counter)
    sd, _ = core.read_checkpoint(native, lazy=True)
    assert torch.equal(sd["lm_head.weight"], eager["llm.embed_tokens.weight"])
    assert set(counter.reads) == {"llm.embed_tokens.weight"}


def test_shape_errors_need_no_tensor_data(tmp_path, monkeypatch):
    ckpt = write_checkpoint("chat_internlm2", tmp_path / "chat")
    sd = load_file(str(ckpt / "model.safetensors"))
    norm = "language_model.model.norm.weight"
    sd[norm] = torch.ones(sd[norm].shape[0] + 1)
    wqkv = "language_model.model.layers.0.attention.wqkv.weight"
    save_file(sd, str(ckpt / "model.safetensors"))
    counter = CountingSafeOpen()
    monkeypatch.setattr(lazy, "safe_open", counter)
    with pytest.raises(CheckpointError, match=rf"tensor {norm} has shape \(65,\), expected \(64,\)"):
        core.read_checkpoint(ckpt, lazy=True)
    sd[norm] = sd[norm][:-1]
    sd[wqkv] = sd[wqkv][:-1]
    save_file(sd, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor {wqkv} has shape"):
        core.read_checkpoint(ckpt, lazy=True)
    sd[wqkv] = torch.cat([sd[wqkv], sd[wqkv][:1]])
    sd.pop(norm)
    save_file(sd, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"missing tensors: {norm}"):
        core.read_checkpoint(ckpt, lazy=True)
    assert not counter.reads
