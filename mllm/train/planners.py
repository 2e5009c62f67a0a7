"""DCP planners that save and load local shards placed at explicit offsets of the full tensors.

``torch.distributed.checkpoint`` describes every saved tensor by its global size and a list of chunks (offsets +
sizes); on load it reads, for each requested chunk, the overlapping parts of the saved ones. DTensor cannot
describe our uneven tensor-parallel shards (the last rank's dummy ViT heads and vocabulary padding are stripped
before saving), so these planners extend the documented ``DefaultSavePlanner`` / ``DefaultLoadPlanner`` hooks:
the state dict holds plain local tensors and a side table ``chunks`` (name -> ``Chunk``) places them. Names
without a chunk behave exactly as with the default planners (whole tensors; replicated copies written once).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from mllm.train.state import Chunk


class ChunkSavePlanner(DefaultSavePlanner):
    """Writes ``state_dict[name]`` as the chunk ``chunks[name]`` of a tensor of its global size."""

    def __init__(self, chunks: dict[str, Chunk]) -> None:
        super().__init__(flatten_state_dict=False)  # our names are flat already ("model/llm.norm.weight")
        self.chunks = chunks

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        self.plan = dataclasses.replace(plan, items=[self._place(item) for item in plan.items])
        return self.plan

    def _place(self, item: WriteItem) -> WriteItem:
        chunk = self.chunks.get(item.index.fqn)
        if chunk is None or item.tensor_data is None:
            return item
        offsets = torch.Size(chunk.offsets)
        data = item.tensor_data
        return dataclasses.replace(
            item,
            index=MetadataIndex(item.index.fqn, offsets),
            type=WriteItemType.SHARD,  # one of several chunks of the tensor
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=offsets, sizes=data.chunk.sizes),
                properties=data.properties,
                size=torch.Size(chunk.global_size),
            ),
        )

    def lookup_object(self, index: MetadataIndex):
        if index.fqn in self.chunks:  # the default lookup expects whole tensors at offset 0
            return self.state_dict[index.fqn]
        return super().lookup_object(index)


class ChunkLoadPlanner(DefaultLoadPlanner):
    """Reads into ``state_dict[name]`` the region ``chunks[name]`` of the saved tensor, from any saved chunks."""

    def __init__(self, chunks: dict[str, Chunk]) -> None:
        super().__init__(flatten_state_dict=False)
        self.chunks = chunks

    def create_local_plan(self) -> LoadPlan:
        whole = {k: v for k, v in self.state_dict.items() if k not in self.chunks}
        everything, self.state_dict = self.state_dict, whole
        try:
            plan = super().create_local_plan()
        finally:
            self.state_dict = everything
        items = list(plan.items)
        for name, chunk in self.chunks.items():
            local = self.state_dict[name]
            saved = self.metadata.state_dict_metadata.get(name)
            if not isinstance(saved, TensorStorageMetadata):
                raise RuntimeError(f"Missing key in checkpoint state_dict: {name}.")
            if tuple(saved.size) != tuple(chunk.global_size):
                raise ValueError(
                    f"Size mismatch between saved {tuple(saved.size)} and current {chunk.global_size} for {name}"
                )
            want = ChunkStorageMetadata(offsets=torch.Size(chunk.offsets), sizes=local.size())
            items += create_read_items_for_chunk_list(name, saved, [want])
        return dataclasses.replace(plan, items=items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        if index.fqn in self.chunks:  # read items address our local tensor relative to its own start
            return self.state_dict[index.fqn]
        return super().lookup_tensor(index)
