"""The GPU fast-path keys of a run (``fp8.*``, ``train.compile``, ``optim.implementation``,
``model.attention_backend``): validation before any process group, and their application to a rank's model.

Order in the trainer (``apply_fast_path``): the model is materialized, then its linears are converted to FP8
(torchao; the TE backend instead runs its forward under ``te_fp8_autocast``), then its blocks are compiled, then
the optimizer is built with ``optim.implementation``. FP8 and compilation keep parameter names, so checkpoints
do not change.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from mllm.kernels.deps import is_available
from mllm.kernels.fp8 import TE_RECIPES, TORCHAO_RECIPES
from mllm.kernels.optim import ADAMW_IMPLEMENTATIONS
from mllm.train.config import RunConfig

GPU_ONLY_ATTENTION = {
    "flex": "FlexAttention has no CPU backward",
    "flash": "flash-attn kernels run only on CUDA",
}


class FastPathError(ValueError):
    """A fast-path setting that cannot run here; one line naming the key and the fix."""


def training_device_type(run: RunConfig) -> str:
    """'cuda' or 'cpu', as ``mllm.train.setup.resolve_device`` will pick it (without touching a device)."""
    if run.train.device == "cuda" or (run.train.device == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def validate_fast_path(run: RunConfig, device_type: str | None = None) -> None:
    """Raise ``FastPathError`` (one line) for a fast-path combination that cannot train on ``device_type``."""
    device_type = device_type or training_device_type(run)
    impl = run.optim.implementation
    if impl not in ADAMW_IMPLEMENTATIONS:
        raise FastPathError(f"optim.implementation={impl!r}: use one of {', '.join(ADAMW_IMPLEMENTATIONS)}")
    backend = run.model.attention_backend
    if device_type == "cpu" and backend in GPU_ONLY_ATTENTION:
        raise FastPathError(
            f"model.attention_backend={backend!r} cannot train on CPU ({GPU_ONLY_ATTENTION[backend]}): "
            "set model.attention_backend=sdpa (or auto) for CPU training"
        )
    fp8 = run.fp8
    if not fp8.enabled:
        return
    te = run.parallel.layer_backend == "te"
    recipes = TE_RECIPES if te else TORCHAO_RECIPES
    if fp8.recipe not in recipes:
        raise FastPathError(
            f"fp8.recipe={fp8.recipe!r} is not a recipe of parallel.layer_backend={run.parallel.layer_backend}: "
            f"use one of {', '.join(recipes)}"
        )
    if fp8.bf16_llm_edge_layers < 0:
        raise FastPathError(f"fp8.bf16_llm_edge_layers={fp8.bf16_llm_edge_layers} must be >= 0")
    if te:
        if device_type != "cuda":
            raise FastPathError(
                "fp8.enabled=true with parallel.layer_backend=te needs CUDA (Transformer Engine)"
            )
        return
    if not is_available("torchao"):
        raise FastPathError(
            "fp8.enabled=true needs the 'torchao' package (torch backend): pip install 'mllm[gpu]', or set "
            "fp8.enabled=false"
        )
    if device_type == "cpu" and fp8.emulate is False:
        raise FastPathError(
            "fp8.enabled=true with fp8.emulate=false needs CUDA FP8 GEMMs: on CPU leave fp8.emulate unset "
            "(null: emulated GEMMs) or set it true"
        )


def apply_fast_path(pm, run: RunConfig) -> dict[str, list[str]]:
    """FP8 (torchao, torch backend) then ``torch.compile`` of the blocks of this rank's module, in place.

    Returns the converted / compiled module names (for the start-up log)."""
    done: dict[str, list[str]] = {}
    if run.fp8.enabled and run.parallel.layer_backend != "te":
        from mllm.kernels.fp8 import apply_fp8_training

        done["fp8"] = apply_fp8_training(pm.module, run.fp8, run.model.text.num_layers)
    if run.train.compile:
        from mllm.kernels.compile import compile_blocks

        done["compiled"] = compile_blocks(pm.module)
    return done


def fp8_amax_group(mesh) -> dist.ProcessGroup | None:
    """The data x tensor parallel group of this rank's pipeline stage (TE reduces delayed-scaling amaxes over
    it: every rank in it runs the same layers). Every rank must call this (it creates groups)."""
    if mesh.pp == 1:
        return dist.group.WORLD
    size = mesh.dp * mesh.tp  # rank order is pp-major: stage p holds ranks [p * size, (p + 1) * size)
    mine, _ = dist.new_subgroups_by_enumeration(
        [list(range(p * size, (p + 1) * size)) for p in range(mesh.pp)]
    )
    return mine


def forward_context(run: RunConfig, amax_group) -> contextlib.AbstractContextManager:
    """The TE FP8 autocast for the TE backend with ``fp8.enabled``; a null context otherwise."""
    if not (run.fp8.enabled and run.parallel.layer_backend == "te"):
        return contextlib.nullcontext()
    from parallel.te_backend import te_fp8_autocast

    return te_fp8_autocast(run.fp8, amax_group)
