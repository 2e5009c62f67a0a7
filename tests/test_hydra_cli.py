"""Hydra's command-line conventions on ``python -m mllm.train``: ``--cfg job`` prints the resolved config after
validating it, ``+key=value`` adds where the schema allows and otherwise fails naming the key."""

from __future__ import annotations

from pathlib import Path

import yaml

from mllm.train.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def test_cfg_job_prints_the_resolved_config_with_added_keys(capsys):
    assert main(["--config-name=tiny_sft", "--cfg", "job", "train.steps=7", "+optim.lr_mult.vision=0.1"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    tiny = yaml.safe_load((REPO / "recipes" / "model" / "tiny.yaml").read_text())
    recipe = yaml.safe_load((REPO / "recipes" / "tiny_sft.yaml").read_text())
    assert printed["train"]["steps"] == 7
    assert printed["optim"]["lr_mult"] == {"vision": 0.1}
    assert printed["optim"]["lr"] == recipe["optim"]["lr"]
    assert {k: printed["model"]["text"][k] for k in tiny["text"]} == tiny["text"]  # the bundled preset
    assert printed["logging"]["run_name"] == "tiny_sft"


def test_cfg_job_validates(capsys):
    assert main(["--config-name=tiny_sft", "--cfg", "job", "parallel.tp=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "tp" in err[0]


def test_plus_key_unknown_to_the_schema_fails_naming_it(capsys):
    assert main(["--config-name=tiny_sft", "--cfg", "job", "+train.stepz=7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "train.stepz" in err and "\n" not in err
    assert main(["--config-name=tiny_sft", "--cfg", "job", "+train.steps=7"]) == 2  # exists: set it without +
    assert "train.steps" in capsys.readouterr().err
