"""Lazy state dicts: tensor names and shapes known up front, tensor data read from disk only on access.

Initializing a pipeline stage from a Hugging Face checkpoint needs only that stage's tensors; reading the whole
checkpoint on every rank costs ~51 GB of host RAM per rank for a 26B model. ``SafetensorsSource`` lists the
tensors of a (sharded) safetensors directory from the files' headers, and ``map_lazily`` runs a per-tensor
HF -> ours mapping on meta tensors (names, shapes and shape errors without data), then again on the real tensor
when one of its outputs is asked for.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from mllm.convert.errors import CheckpointError

Loader = Callable[[], torch.Tensor]
TensorMapper = Callable[[str, torch.Tensor], "dict[str, torch.Tensor] | None"]
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class _Entry:
    """One tensor: its shape and how to load it (shared by aliases such as a tied lm_head)."""

    __slots__ = ("load", "shape")

    def __init__(self, shape: tuple[int, ...], load: Loader) -> None:
        self.shape, self.load = shape, load


class LazyStateDict(Mapping[str, torch.Tensor]):
    """name -> tensor, loaded (and mapped) on ``__getitem__``; ``shape(name)`` reads no data.

    Each access loads again (nothing is kept), so a consumer that holds one tensor at a time holds only that.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def add(self, name: str, shape: tuple[int, ...], load: Loader) -> None:
        self._entries[name] = _Entry(tuple(shape), load)

    def alias(self, name: str, existing: str) -> None:
        """``name`` is the same tensor as ``existing`` (e.g. tied embeddings)."""
        self._entries[name] = self._entries[existing]

    def update_from(self, other: Mapping[str, torch.Tensor]) -> None:
        """Take ``other``'s entries (lazily when it is lazy), replacing ours of the same name."""
        if isinstance(other, LazyStateDict):
            self._entries.update(other._entries)
            return
        for name, tensor in other.items():
            self.add(name, tuple(tensor.shape), lambda t=tensor: t)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._entries[name].load()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def materialize(self) -> dict[str, torch.Tensor]:
        """All tensors in memory; aliases stay one tensor (as a tied checkpoint read eagerly)."""
        loaded: dict[int, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for name, entry in self._entries.items():
            if id(entry) not in loaded:
                loaded[id(entry)] = entry.load()
            out[name] = loaded[id(entry)]
        return out


def shapes_of(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, without reading a lazy state dict's data."""
    if isinstance(sd, LazyStateDict):
        return {name: sd.shape(name) for name in sd}
    return {name: tuple(t.shape) for name, t in sd.items()}


class SafetensorsSource:
    """The tensors of safetensors files, listed from their headers; data read per tensor on ``load``.

    A small cache keeps the last few loaded tensors so that one fused tensor split into several of ours
    (qkv -> q, k, v) is read once when they are asked for together.
    """

    def __init__(self, paths: list[Path], cache_size: int = 2) -> None:
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, torch.Tensor] = {}
        for path in paths:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    part = f.get_slice(key)
                    dtype = _DTYPES.get(part.get_dtype())
                    if dtype is None:
                        raise CheckpointError(
                            f"{path}: tensor {key} has unsupported dtype {part.get_dtype()}"
                        )
                    self._meta[key] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
                    self._file_of[key] = path
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    def names(self) -> list[str]:
        return list(self._meta)

    def meta(self, name: str) -> torch.Tensor:
        """A meta tensor with the stored shape and dtype (no data)."""
        return self._meta[name]

    def load(self, name: str) -> torch.Tensor:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        with safe_open(str(self._file_of[name]), framework="pt") as f:
            tensor = f.get_tensor(name)
        self._cache[name] = tensor
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return tensor


def map_lazily(source: SafetensorsSource, map_one: TensorMapper) -> tuple[LazyStateDict, list[str]]:
    """(our lazy tensors, source names ``map_one`` does not map). ``map_one(name, tensor)`` -> our name(s)
    and tensor(s) or None; it runs on meta tensors here (raising its shape errors now) and per access later."""
    out = LazyStateDict()
    unmapped: list[str] = []
    for name in source.names():
        mapped = map_one(name, source.meta(name))
        if mapped is None:
            unmapped.append(name)
            continue
        for ours, meta in mapped.items():
            out.add(ours, tuple(meta.shape), lambda n=name, o=ours: map_one(n, source.load(n))[o])
    return out, unmapped
