"""Resuming the data stream with another dp size (mllm/data/elastic.py).

Reference: what the old ranks really trained (the sample ids of their batches) plus what the new ranks' sample
orders hold of the interrupted epochs must be every sample of those epochs exactly once; samples are identified
by their keys, read independently from the shards.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import torch
from conftest import small_config

from mllm.data import build_loader
from mllm.data.sampling import RemainderPlan, SampleOrder
from mllm.data.shards import prepare
from mllm.data.sources import open_sources


def keys(batch) -> list[str]:
    return [k for row in batch.sample_ids for k in row]


def assert_same(a, b):
    for name in ("input_ids", "labels", "segment_ids", "position_ids", "pixel_values", "image_flags"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.sample_ids == b.sample_ids


@pytest.fixture(scope="module")
def data(synth_dir, tmp_path_factory):
    """Shards of 40 samples: two datasets of 5 shards (ranks own whole shards) and one of a single shard
    (every rank reads it and keeps every dp-th sample)."""
    out = tmp_path_factory.mktemp("elastic_shards")
    prepare(synth_dir.meta, out, shard_size=40, progress=False)
    cfg = small_config(out, synth_dir.tokenizer)
    sources = open_sources(out)
    key_of = {
        (d, unit, idx): raw.key
        for d, src in enumerate(sources)
        for unit in range(len(src.unit_counts))
        for idx, raw in src.read_unit(unit)
    }
    return cfg, sources, key_of


def run(cfg, dp, batches, all_states=None):
    """Every rank of a dp group: (trained keys per rank, JSON round-tripped states, loaders)."""
    loaders = [build_loader(cfg, r, dp, all_states=all_states) for r in range(dp)]
    trained = [[k for _ in range(batches) for k in keys(next(loader))] for loader in loaders]
    states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]
    for loader in loaders:
        loader.close()
    return trained, states, loaders


def remainder_keys(cfg, sources, key_of, state, rank, dp) -> tuple[list[str], list[int]]:
    """Keys of a new rank's share of the interrupted epochs, in stream order, and each dataset's newest
    interrupted epoch (-1: none), from the sample order of its state."""
    order = SampleOrder(sources, cfg.seed, rank, dp, cfg.shuffle_buffer)
    order.load_state_dict(state["order"])
    labels = [-1 if r is None else r["epoch"] for r in state["order"]["remainder"]]
    need = sum(order.plan(d, e).length for d, e in enumerate(labels) if e >= 0)
    out = []
    while len(out) < need:
        _, (d, epoch, seq) = order.next()
        if epoch == labels[d]:
            plan = order.plan(d, epoch)
            assert isinstance(plan, RemainderPlan)
            _, unit, idx = plan.origin(seq)
            out.append(key_of[(d, unit, idx)])
    return out, labels


def waiting_keys(cfg, sources, key_of, state, rank, dp) -> list[str]:
    """Keys of the samples in a rank's packer buffer (read, not trained) at save time."""
    order = SampleOrder(sources, cfg.seed, rank, dp, cfg.shuffle_buffer)
    order.load_state_dict(state["order"])
    waiting, out = set(state["packer"]["pos"]), []
    while order.k < state["k_next"]:
        k, (d, epoch, seq) = order.next()
        if k in waiting:
            out.append(key_of[(d, *order.plan(d, epoch).locate(seq))])
    return out


def check_partition(data, trained_before, new_states, new_dp):
    """Trained before + the new ranks' remainders = every sample of each interrupted epoch exactly once."""
    cfg, sources, key_of = data
    remainders, labels = [], None
    for j, state in enumerate(new_states):
        rem, lab = remainder_keys(cfg, sources, key_of, state, j, new_dp)
        assert labels is None or lab == labels  # the same epoch boundary on every new rank
        remainders.append(rem)
        labels = lab
    assert min(labels) >= 0  # every dataset was started
    counts = Counter(k for ks in trained_before for k in ks) + Counter(k for r in remainders for k in r)
    dataset_of = {key: sources[d].name for (d, _, _), key in key_of.items()}
    epochs = {s.name: labels[d] + 1 for d, s in enumerate(sources)}
    missing_or_twice = {k: n for k, n in counts.items() if n != epochs[dataset_of[k]]}
    assert not missing_or_twice
    assert set(counts) == set(key_of.values())
    sizes = [len(r) for r in remainders]
    assert max(sizes) - min(sizes) <= len(sources)  # an even split (each dataset's chunks differ by <= 1)
    return remainders, {name for d, name in enumerate(s.name for s in sources) if labels[d] == 0}


@pytest.mark.parametrize("old_dp,new_dp", [(2, 4), (4, 2), (2, 3)])
def test_no_sample_skipped_or_repeated_across_a_dp_change(data, old_dp, new_dp, caplog):
    cfg, sources, key_of = data
    trained, states, _ = run(cfg, old_dp, 4 if old_dp == 2 else 2)
    assert not set.intersection(*map(set, trained))  # old ranks disjoint
    with caplog.at_level(logging.INFO, logger="mllm.data"):
        new = [build_loader(cfg, j, new_dp, all_states=states[::-1] + states[:1]) for j in range(new_dp)]
    lines = [r.getMessage() for r in caplog.records if "re-read" in r.getMessage()]
    waiting = [k for r, s in enumerate(states) for k in waiting_keys(cfg, sources, key_of, s, r, old_dp)]
    assert len(lines) == 1 and f"dp {old_dp} -> {new_dp}: {len(waiting)} samples re-read" in lines[0]
    assert all(loader.elastic_summary.reread == len(waiting) for loader in new)
    assert 0 < len(waiting) <= old_dp * cfg.pack_buffer  # only the packer buffers are read again
    new_states = [loader.state_dict() for loader in new]
    remainders, in_first_epoch = check_partition(data, trained, new_states, new_dp)
    assert set(waiting) <= {k for r in remainders for k in r}  # buffered samples are not lost
    # The loaders train their remainders (buffered samples included). Once a rank's share of a dataset is pulled,
    # its next epoch mixes in through the shuffle buffer, as at any epoch end.
    before = {k for ks in trained for k in ks if k.split(":")[0] in in_first_epoch}
    for j, loader in enumerate(new):
        mine, seen, it = set(remainders[j]), set(), iter(loader)
        for _ in range(100):  # stops once drained
            seen |= set(keys(next(it))) & mine
            if seen == mine:
                break
        assert seen == mine and not mine & before
        loader.close()
    # bad-sample accounting: the sum over ranks of samples counted seen is kept (re-reads are not double counted)
    assert sum(s["plan_bad"]["seen"].get(n.name, 0) for s in new_states for n in sources) == sum(
        sum(s["plan_bad"]["seen"].values()) for s in states
    ) - len(waiting)


def test_repeated_dp_changes_keep_the_partition(data):
    cfg, sources, key_of = data
    trained2, states2, _ = run(cfg, 2, 3)
    trained4, states4, _ = run(cfg, 4, 3, all_states=states2)
    new = [build_loader(cfg, j, 3, all_states=states4) for j in range(3)]
    check_partition(data, trained2 + trained4, [loader.state_dict() for loader in new], 3)


def test_elastic_resume_is_deterministic_and_worker_invariant(data):
    cfg, _, _ = data
    _, states, _ = run(cfg, 2, 3)
    cfg2 = small_config(cfg.path, cfg.tokenizer, num_workers=2, decode_threads=2)
    a = build_loader(cfg, 1, 4, all_states=json.loads(json.dumps(states)))
    b = build_loader(cfg2, 1, 4, all_states=states)
    for x, y in zip([next(a) for _ in range(5)], [next(b) for _ in range(5)]):
        assert_same(x, y)
    b.close()


def test_resume_after_an_elastic_resume_is_exact(data):
    """Once resumed on a new dp size, a checkpoint of that dp size resumes bit-identically (both APIs)."""
    cfg, _, _ = data
    _, states, _ = run(cfg, 2, 3)
    full = build_loader(cfg, 1, 3, all_states=states)
    full = [next(full) for _ in range(7)]  # rank 1 of dp 3, uninterrupted since the dp change
    _, states3, _ = run(cfg, 3, 3, all_states=states)
    for resumed in (build_loader(cfg, 1, 3, state=states3[1]), build_loader(cfg, 1, 3, all_states=states3)):
        for x, y in zip(full[3:], [next(resumed) for _ in range(4)]):
            assert_same(x, y)


def test_incomplete_or_mismatched_states_are_clear_errors(data):
    cfg, _, _ = data
    _, states, _ = run(cfg, 2, 1)
    with pytest.raises(ValueError, match=r"dp ranks \[1\] \(of dp size 2\) are missing"):
        build_loader(cfg, 0, 4, all_states=states[:1])
    other = small_config(cfg.path, cfg.tokenizer, seed=7)
    with pytest.raises(ValueError, match="seed"):
        build_loader(other, 0, 4, all_states=states)
