"""LoRA adapters on tensor-parallel linears, sharded consistently with their base layer.

``y = base(x) + s * B(A(dropout(x)))`` with the base's split:

- column-parallel base (weight rows split): ``A`` [r, in] replicated, ``B`` [out/tp, r] split on its out dim
  like the base (same padding: dummy ViT heads). ``h = A x`` enters the tensor-parallel region like the base's
  input: identity forward / all-reduce backward (``copy_to_tensor_parallel``), or with sequence parallelism an
  all-gather of the r-wide ``h`` (not the full-width x) whose backward reduce-scatters; then ``A``'s gradient is
  a partial sum over the sequence shards, all-reduced over tp with the other sequence-parallel parameters.
- row-parallel base (weight columns split): ``A`` [r, in/tp] split on its in dim like the base, ``B`` [out, r]
  replicated. ``h`` is summed over tp (all-reduce, or reduce-scatter over the sequence with sequence
  parallelism, then ``B``'s gradient is a partial sum) and ``B h`` is added to the reduced base output.

Dropout masks come from each rank's RNG, which the trainer seeds identically across tp ranks
(``mllm.train.setup.rank_seed``), so replicated adapters see the same mask.
"""

from __future__ import annotations

import torch
from torch import nn

from mllm.model.lora import adapted_modules, attach_adapter
from parallel.comm import (
    copy_to_tensor_parallel,
    gather_from_sequence_parallel,
    reduce_from_tensor_parallel,
    reduce_scatter_to_sequence_parallel,
)
from parallel.layers import ColumnParallelLinear, RowParallelLinear
from parallel.shard import ShardSpec


def _column_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    h = module.lora_A(module.lora_dropout(args[0]))
    if module.sequence_parallel:
        h = gather_from_sequence_parallel(h, module.tp.group, dim=1)
    else:
        h = copy_to_tensor_parallel(h, module.tp.group)
    return output + module.lora_B(h) * module.lora_scaling


def _row_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    h = module.lora_A(module.lora_dropout(args[0]))
    if module.sequence_parallel:
        h = reduce_scatter_to_sequence_parallel(h, module.tp.group, dim=1)
    else:
        h = reduce_from_tensor_parallel(h, module.tp.group)
    return output + module.lora_B(h) * module.lora_scaling


def parallelize_lora(
    model: nn.Module, cfg, specs: dict[str, ShardSpec]
) -> tuple[dict[str, ShardSpec], set[str]]:
    """Attach sharded adapters to the tensor-parallel linears of ``model`` (after ``parallelize_model_tp``;
    ``cfg`` is ``ModelConfig.lora``, ``specs`` the base layers' shard specs). Returns the adapters' specs and
    the names of adapter parameters whose gradients are partial sums over tp (sequence parallelism)."""
    out: dict[str, ShardSpec] = {}
    partial: set[str] = set()
    for name, module, rank, scaling in list(adapted_modules(model, cfg)):
        base = specs.get(f"{name}.weight")
        if isinstance(module, ColumnParallelLinear):
            local_out = module.weight.shape[0]
            attach_adapter(
                module, (rank, module.in_features), (local_out, rank), scaling, cfg.dropout, _column_hook
            )
            if base is not None:
                out[f"{name}.lora_B.weight"] = ShardSpec(0, base.full, base.padded)
            if module.sequence_parallel and module.tp.size > 1:
                partial.add(f"{name}.lora_A.weight")
        elif isinstance(module, RowParallelLinear):
            local_in = module.weight.shape[1]
            attach_adapter(
                module, (rank, local_in), (module.out_features, rank), scaling, cfg.dropout, _row_hook
            )
            if base is not None:
                out[f"{name}.lora_A.weight"] = ShardSpec(1, base.full, base.padded)
            if module.sequence_parallel and module.tp.size > 1:
                partial.add(f"{name}.lora_B.weight")
        else:
            raise ValueError(
                f"LoRA on {name}: {type(module).__name__} is not a torch tensor-parallel linear; use "
                "parallel.layer_backend=torch with lora.vision / lora.llm"
            )
    return out, partial
