"""In-process checks of the stop requests, pre-flight and checkpoint verification (the fault suite in
tests/faults/ runs them end to end under torchrun and SLURM)."""

from __future__ import annotations

import json
import os
import signal

import pytest

from mllm.train import signals
from mllm.train.preflight import PreflightError, check_data_paths, check_free_space, check_writable, preflight
from mllm.train.verify import damage, file_record, record_files


def test_signals_and_stop_file_are_recorded_and_acknowledged(tmp_path, capfd):
    stops = signals.StopRequests(tmp_path)
    assert stops.local_reason() == signals.NO_STOP
    (tmp_path / signals.STOP_FILE).touch()
    assert stops.local_reason() == signals.STOP_FILE_SEEN
    stops.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stops.local_reason() == signals.SIGUSR1_SEEN
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal, e.g. during the save: recorded, no exit
        assert stops.local_reason() == signals.SIGTERM_SEEN
    finally:
        stops.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert "SIGTERM again: still saving" in capfd.readouterr().err
    stops.acknowledge(rank=0, step=7, reason=signals.SIGTERM_SEEN)
    assert not (tmp_path / signals.STOP_FILE).exists()  # acted on: a later run does not stop at once
    assert (tmp_path / signals.STOPPED_FILE).read_text() == "7 SIGTERM\n"


def test_a_torchrun_restart_of_a_stopped_run_stays_stopped(tmp_path, monkeypatch):
    (tmp_path / signals.STOPPED_FILE).write_text("7 SIGTERM\n")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert signals.stopped_by_earlier_attempt(tmp_path) is None  # a new launch: stale, cleared
    signals.clear_stopped(tmp_path)
    assert not (tmp_path / signals.STOPPED_FILE).exists()
    (tmp_path / signals.STOPPED_FILE).write_text("7 SIGTERM\n")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert signals.stopped_by_earlier_attempt(tmp_path) == "7 SIGTERM"


def test_preflight_names_the_path_and_the_fix(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(
        PreflightError, match=r"afile is a file, not a directory; choose another train.run_dir"
    ):
        check_writable(tmp_path / "afile" / "run", "train.run_dir")
    with pytest.raises(PreflightError, match=r"needs about 1024.00 GiB; free space"):
        check_free_space(tmp_path, 2**40)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"caps": {"root": str(tmp_path), "annotation": "missing.jsonl"}}))

    class Run:  # the one key check_data_paths reads
        class data:
            path = str(meta)

    with pytest.raises(
        PreflightError, match=r"dataset 'caps': annotation 'missing.jsonl' not found; looked at"
    ):
        check_data_paths(Run)


def test_preflight_removes_leftover_temporary_checkpoints(tmp_path, monkeypatch):
    from mllm.config import load_run_config

    run = load_run_config("tiny_sft", [f"train.run_dir={tmp_path}", "data.path=unused"])
    leftover = tmp_path / "checkpoints" / ".tmp_step_00000006"
    (leftover / "extra").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000003").mkdir()
    monkeypatch.setenv("RANK", "0")
    preflight(run, need_data=False)
    assert not leftover.exists() and (tmp_path / "checkpoints" / "step_00000003").is_dir()


def test_verification_finds_truncated_changed_and_missing_files(tmp_path):
    (tmp_path / "extra").mkdir()
    for name, data in {
        "__0_0.distcp": b"a" * 100,
        ".metadata": b"m" * 10,
        "extra/rank_00001.pt": b"r",
    }.items():
        (tmp_path / name).write_bytes(data)
    files = record_files(tmp_path, {"meta.json"}, None)
    assert files["__0_0.distcp"] == file_record(tmp_path / "__0_0.distcp") and files["__0_0.distcp"][0] == 100
    assert damage(tmp_path, files, 0, 1) is None
    (tmp_path / "extra" / "rank_00001.pt").unlink()
    assert damage(tmp_path, files, 0, 1) is None  # a missing per-rank extra is re-seeded, not damage
    (tmp_path / "__0_0.distcp").write_bytes(b"a" * 99 + b"b")
    assert damage(tmp_path, files, 0, 1) == "__0_0.distcp does not match the checksum recorded at commit"
    (tmp_path / "__0_0.distcp").write_bytes(b"a" * 60)
    assert damage(tmp_path, files, 0, 1) == "__0_0.distcp has 60 bytes, 100 were written"
    (tmp_path / ".metadata").unlink()
    assert damage(tmp_path, files, 0, 2) == ".metadata is missing"  # rank 0 of 2 checks every other file
