"""The "2nd finetune" recipes against the InternVL scripts they mirror, and their auto layouts at InternVL's GPU
counts.

Reference: the arguments of each script in github.com/OpenGVLab/InternVL, ``internvl_chat/shell/<dir>/2nd_finetune/``
(copied by hand below: GPUS, BATCH_SIZE, --learning_rate, --weight_decay, --drop_path_rate, --freeze_backbone /
--freeze_mlp / --freeze_llm, --use_llm_lora, --max_seq_length, --max_dynamic_patch, --conv_style; all of them
also use --num_train_epochs 1, --warmup_ratio 0.03, --lr_scheduler_type cosine, --use_thumbnail True).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm.config import load_run_config
from mllm.train.plan_report import resolve_auto_layout
from mllm.train.planner import GIB, Hardware, plan

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

# recipe: (script, GPUS, BATCH_SIZE, lr, weight decay, drop path, (freeze backbone, mlp, llm), llm lora,
#          max_seq_length, max_dynamic_patch, conv_style)
SCRIPTS = {
    "internvl1_5_26b_finetune": ("internvl1.5/2nd_finetune/internvl_chat_v1_5_internlm2_20b_dynamic_res_2nd_finetune_full.sh",
                                 8, 128, 2e-5, 0.05, 0.4, (True, False, False), 0, 4096, 12, "internlm2-chat"),
    "internvl1_5_26b_finetune_lora": ("internvl1.5/2nd_finetune/internvl_chat_v1_5_internlm2_20b_dynamic_res_2nd_finetune_lora.sh",
                                      2, 16, 2e-5, 0.05, 0.0, (True, True, True), 16, 4096, 12, "internlm2-chat"),
    "mini_internvl_2b_finetune": ("internvl1.5/2nd_finetune/internvl_chat_v1_5_internlm2_1_8b_dynamic_res_2nd_finetune_full.sh",
                                  8, 128, 4e-5, 0.01, 0.1, (True, False, False), 0, 4096, 12, "internlm2-chat"),
    "mini_internvl_2b_finetune_lora": ("internvl1.5/2nd_finetune/internvl_chat_v1_5_internlm2_1_8b_dynamic_res_2nd_finetune_lora.sh",
                                       2, 16, 4e-5, 0.01, 0.0, (True, True, True), 16, 4096, 12, "internlm2-chat"),
    "internvl2_5_8b_finetune": ("internvl2.5/2nd_finetune/internvl2_5_8b_dynamic_res_2nd_finetune_full.sh",
                                8, 128, 4e-5, 0.05, 0.1, (True, False, False), 0, 8192, 6, "internvl2_5"),
    "internvl2_5_8b_finetune_lora": ("internvl2.5/2nd_finetune/internvl2_5_8b_dynamic_res_2nd_finetune_lora.sh",
                                     2, 16, 4e-5, 0.05, 0.0, (True, True, True), 16, 8192, 6, "internvl2_5"),
    "internvl3_8b_finetune": ("internvl3.0/2nd_finetune/internvl3_8b_dynamic_res_2nd_finetune_full.sh",
                              8, 128, 2e-5, 0.05, 0.0, (True, False, False), 0, 16384, 12, "internvl2_5"),
}  # fmt: skip


@pytest.mark.parametrize("recipe", SCRIPTS)
def test_recipe_mirrors_its_internvl_script(recipe):
    script, _, batch, lr, wd, drop_path, freeze, lora, seq, tiles, template = SCRIPTS[recipe]
    assert f"internvl_chat/shell/{script}" in (RECIPES / f"{recipe}.yaml").read_text()  # cited
    run = load_run_config(recipe)
    p, o, d = run.parallel, run.optim, run.data
    assert (run.train.global_batch_size, o.lr, o.weight_decay, run.model.vision.drop_path_rate) == (
        batch,
        lr,
        wd,
        drop_path,
    )
    assert (p.freeze_vision, p.freeze_projector, p.freeze_llm) == freeze
    assert (run.model.lora.llm, run.model.lora.vision, run.model.lora.part("llm")[1] if lora else 2.0) == (
        lora,
        0,
        2.0,
    )  # lora_alpha = 2 x rank
    assert (d.seq_len, d.max_dynamic_patch, d.min_dynamic_patch, d.use_thumbnail) == (seq, tiles, 1, True)
    assert d.template == template and run.model.template == template
    assert (run.train.epochs, o.warmup_ratio, o.warmup_steps, o.schedule) == (1, 0.03, None, "cosine")
    assert p.layout == "auto" and p.frozen_dtype == "compute"


@pytest.mark.parametrize("recipe", ["internvl1_5_26b_finetune", "internvl1_5_26b_finetune_lora"])
def test_auto_layout_fits_internvls_gpu_count(recipe):
    """At InternVL's GPU count with 80 GB GPUs the planner finds a layout with a peak of at most 76 GiB (95%)."""
    gpus = SCRIPTS[recipe][1]
    run = load_run_config(recipe)
    chosen = resolve_auto_layout(run, gpus, 80.0)
    assert chosen.max_rank_bytes <= 76 * GIB and run.parallel.layout == "manual"
    assert (
        plan(run, gpus, Hardware(gpu_memory_gib=80.0)).max_rank_bytes == chosen.max_rank_bytes
    )  # as applied
