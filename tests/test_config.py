"""Hydra recipes: presets equal the Python ones, typing is enforced, every consistency check speaks clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mllm.config import RECIPES_DIR, ConfigError, load_run_config, validate_run_config
from mllm.model.config import PRESETS
from mllm.model.internvl import build_model, count_parameters

RECIPES = sorted(p.stem for p in Path(RECIPES_DIR).glob("*.yaml"))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_yaml_model_preset_equals_python_preset(preset, tmp_path):
    # A root config that only selects the preset (recipes may override model fields).
    shutil.copytree(Path(RECIPES_DIR) / "model", tmp_path / "model")
    (tmp_path / "only_model.yaml").write_text(f"defaults:\n  - run_schema\n  - model: {preset}\n  - _self_\n")
    run = load_run_config("only_model", config_dir=tmp_path)
    assert run.model == PRESETS[preset]()


def test_26b_preset_parameter_counts_on_meta():
    model_cfg = load_run_config("tiny_sft", ["model=internvl_chat_v1_5"]).model
    counts = count_parameters(build_model(model_cfg, device="meta"))
    assert counts["vision"] == pytest.approx(5.54e9, rel=0.005)
    assert counts["projector"] == pytest.approx(116.43e6, rel=0.005)
    assert counts["llm"] == pytest.approx(19.86e9, rel=0.005)


def test_every_recipe_composes_and_validates():
    assert {
        "internvl1_5_26b_pretrain",
        "internvl1_5_26b_sft",
        "mlp_warmup",
        "mini_internvl_2b_pretrain",
        "mini_internvl_2b_sft",
        "tiny_pretrain",
        "tiny_sft",
    } <= set(RECIPES)
    for name in RECIPES:
        run = load_run_config(name, ["data.path=/data/meta.json"])
        world = run.parallel.tp * run.parallel.pp * 2
        run.train.global_batch_size = max(run.train.global_batch_size, 2 * run.data.micro_batch_size)
        validate_run_config(run, world, need_data=False)  # the data files: test_data_files_are_checked...


def test_internvl_1_5_numbers():
    pre = load_run_config("internvl1_5_26b_pretrain")
    sft = load_run_config("internvl1_5_26b_sft")
    warm = load_run_config("mlp_warmup")
    for run in (pre, sft, warm):
        o = run.optim
        assert (o.beta1, o.beta2, o.eps, o.weight_decay, o.schedule) == (0.9, 0.999, 1e-8, 0.05, "cosine")
        assert o.warmup_ratio > 0 and run.data.seq_len == 4096 and run.data.max_dynamic_patch == 12
    assert (pre.optim.lr, pre.train.global_batch_size, pre.model.vision.drop_path_rate) == (1e-5, 2048, 0.2)
    assert (pre.parallel.freeze_vision, pre.parallel.freeze_projector, pre.parallel.freeze_llm) == (
        False,
        False,
        True,
    )
    assert (sft.optim.lr, sft.train.global_batch_size, sft.model.vision.drop_path_rate) == (2e-5, 1024, 0.4)
    assert not (sft.parallel.freeze_vision or sft.parallel.freeze_projector or sft.parallel.freeze_llm)
    assert warm.optim.lr == 2e-4
    assert (warm.parallel.freeze_vision, warm.parallel.freeze_projector, warm.parallel.freeze_llm) == (
        True,
        False,
        True,
    )


def test_stable_override_keys():
    run = load_run_config(
        "tiny_sft",
        [
            "train.steps=7",
            "train.run_dir=/tmp/x",
            "train.seed=3",
            "data.path=/d/meta.json",
            "parallel.tp=2",
            "parallel.pp=2",
            "checkpoint.every=2",
            "checkpoint.resume=auto",
            "model.init_from=/hf/dir",
        ],
    )
    assert (run.train.steps, run.train.run_dir, run.train.seed, run.data.path) == (
        7,
        "/tmp/x",
        3,
        "/d/meta.json",
    )
    assert (run.parallel.tp, run.parallel.pp, run.checkpoint.every) == (2, 2, 2)
    assert (run.checkpoint.resume, run.model.init_from) == ("auto", "/hf/dir")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.stepz=3"], r"Key 'stepz' not in 'TrainConfig'"),
        (["train.steps=many"], r"could not be converted to Integer \| full_key: train.steps"),
        (["model.vision.bogus=1"], r"Key 'bogus' not in 'VisionConfig'"),
    ],
)
def test_unknown_keys_and_wrong_types_are_rejected(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config("tiny_sft", overrides)


def test_unknown_recipe_lists_available():
    with pytest.raises(ConfigError, match=r"no recipe 'nope'.*tiny_sft"):
        load_run_config("nope")


@pytest.mark.parametrize(
    "overrides, world, match",
    [
        (["parallel.tp=3"], 4, r"world size 4 is not divisible by tp\*pp = 3\*1"),
        (["parallel.tp=4"], 4, r"parallel.tp=4 must divide model.text.num_kv_heads=2"),
        (["parallel.pp=2", "parallel.layers_per_stage=[1,2]"], 4, r"layers_per_stage \[1, 2\] sums to 3"),
        (["parallel.pp=8"], 8, r"num_layers=4 < 8 pipeline stages"),
        (["train.global_batch_size=3"], 2, r"global_batch_size=3 must be a multiple of .* = 1 \* 2"),
        (["data.max_tiles_per_row=3"], 1, r"max_tiles_per_row=3 < 5 tiles of one image"),
        (["data.num_image_token=16"], 1, r"data.num_image_token=16 but the model makes 4 tokens"),
        (
            ["data.seq_len=64", "data.max_dynamic_patch=16", "data.max_tiles_per_row=17"],
            1,
            r"68 tokens, which does not fit data.seq_len=64",
        ),
        (["optim.schedule=step"], 1, r"optim.schedule='step' is unknown"),
        (["data.path="], 1, r"data.path is empty"),
    ],
)
def test_consistency_checks_have_one_clear_message(overrides, world, match):
    run = load_run_config("tiny_sft", ["data.path=/d/meta.json", *overrides])
    with pytest.raises(ConfigError, match=match) as info:
        validate_run_config(run, world)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    from mllm.data.synth import synth

    return synth(tmp_path_factory.mktemp("synth"), num_samples=8, progress=False)


def _data_run(synth_data, *overrides: str):
    return load_run_config(
        "tiny_sft", [f"data.path={synth_data.meta}", f"data.tokenizer={synth_data.tokenizer}", *overrides]
    )


def test_a_run_on_real_data_files_validates(synth_data):
    validate_run_config(_data_run(synth_data), 2)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["data.path={tmp}/missing.json"],
            r"^data.path=\S*/missing.json: no such file or directory; set it to",
        ),
        (
            ["data.tokenizer="],
            r"^data.tokenizer is empty: set it to a local Hugging Face tokenizer directory$",
        ),
        (["data.tokenizer={tmp}/no_tok"], r"^data.tokenizer=\S*/no_tok: no such directory; set it to"),
        (
            ["model.image_token_id=9"],
            r"^model.image_token_id=9 but <IMG_CONTEXT> is token 7 of data.tokenizer=\S+: set "
            r"model.image_token_id=7$",
        ),
        (["model.attention_backend=flex"], r"^model.attention_backend='flex' cannot train on CPU"),
    ],
)
def test_data_files_and_fast_path_are_checked_in_one_line(synth_data, tmp_path, overrides, match):
    run = _data_run(synth_data, *(o.format(tmp=tmp_path) for o in overrides))
    with pytest.raises(ConfigError, match=match) as info:
        validate_run_config(run, 1)
    assert "\n" not in str(info.value)


def test_tokenizer_without_the_image_token_is_named(synth_data, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["plain text"], trainer=trainers.BpeTrainer(special_tokens=["<s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>").save_pretrained(str(tmp_path / "plain"))
    run = _data_run(synth_data, f"data.tokenizer={tmp_path / 'plain'}")
    with pytest.raises(ConfigError, match=r"^data.tokenizer=\S*/plain has no <IMG_CONTEXT> token: use the"):
        validate_run_config(run, 1)


def test_cli_rejects_a_missing_data_path_before_any_process_group(capsys, tmp_path):
    import torch.distributed as dist

    from mllm.train.__main__ import main

    missing = tmp_path / "nope" / "meta.json"
    assert main(["--config-name=tiny_sft", f"data.path={missing}", f"train.run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"error: data.path={missing}: no such file or directory; set it to a meta JSON or a prepared shard directory\n"
    )
    assert not dist.is_initialized() and not (tmp_path / "metrics.jsonl").exists()
