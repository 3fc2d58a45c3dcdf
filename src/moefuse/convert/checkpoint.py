"""Reading safetensors checkpoint folders lazily: names, shapes and dtypes from the headers, data in pieces.

A :class:`Piece` is a contiguous range of one tensor's elements (row-major); conversions are made of pieces,
so they never need a whole tensor, let alone a whole shard, in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

# safetensors' dtype names (as in the file headers) and their torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Pages of a memory-mapped shard that were read stay in the process's RSS until the file is closed: close the
# open files after reading this many bytes, so that reading a whole model does not map it all.
_MAPPED_BYTES_BEFORE_CLOSE = 64 * 2**20
# Whole tensors and ranges of whole rows are read in chunks of about this size (e.g. an embedding matrix).
READ_CHUNK_BYTES = 64 * 2**20


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as asked; the message names the file and the fix."""


@dataclass(frozen=True)
class Piece:
    """Elements ``start:stop`` of tensor ``name`` flattened (row-major): a contiguous run of its bytes."""

    name: str
    start: int
    stop: int


def piece_index(shape: tuple[int, ...], start: int, stop: int) -> tuple[slice, ...]:
    """The ``get_slice`` index of elements ``start:stop`` of a tensor of ``shape``: whole rows of some leading
    dimension, possibly inside fixed indices of the dimensions before it."""
    index = []
    for dim in range(len(shape)):
        inner = math.prod(shape[dim + 1 :])
        if start % inner == 0 and stop % inner == 0:
            index.append(slice(start // inner, stop // inner))
            return tuple(index)
        row = start // inner
        if (stop - 1) // inner != row:
            raise ValueError(f"elements {start}:{stop} of a {list(shape)} tensor are not a box of rows")
        index.append(slice(row, row + 1))
        start, stop = start - row * inner, stop - row * inner
    return tuple(index)


def row_chunks(
    shape: tuple[int, ...], piece: Piece, itemsize: int, limit: int = READ_CHUNK_BYTES
) -> list[Piece]:
    """``piece`` cut into runs of whole rows of ``shape`` of about ``limit`` bytes (as it is when it is smaller
    or not made of whole rows)."""
    row = math.prod(shape[1:]) if shape else 1
    size = piece.stop - piece.start
    if size * itemsize <= limit or piece.start % row or piece.stop % row:
        return [piece]
    step = max(1, limit // (row * itemsize)) * row
    return [Piece(piece.name, a, min(a + step, piece.stop)) for a in range(piece.start, piece.stop, step)]


@dataclass
class Checkpoint:
    """The safetensors files of a checkpoint folder, read lazily: names, shapes and dtypes come from the headers.

    ``files``, ``shapes`` and ``dtypes`` are keyed by tensor name, in the order of the shards and of each shard's
    header. Data is read with :meth:`tensor` or :meth:`read` (a :class:`Piece`)."""

    path: Path
    files: dict[str, Path] = field(default_factory=dict)  # tensor name -> file
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # safetensors dtype names: "BF16", "F32", ...
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)
    _mapped: int = field(default=0, repr=False)

    @classmethod
    def open(cls, path: str | Path, index_name: str = "model.safetensors.index.json") -> Checkpoint:
        """Read the headers of every shard (those an index names, else every ``*.safetensors``) of ``path``."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(
                f"{path}: not a folder; give the folder that holds config.json and *.safetensors"
            )
        ckpt = cls(path)
        index = path / index_name
        weight_map: dict[str, str] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"{index}: not a safetensors index ({e!r}); restore or remove the file"
                ) from e
            shard_names = sorted(set(weight_map.values()))
        else:
            shard_names = sorted(p.name for p in path.glob("*.safetensors"))
            if not shard_names:
                raise CheckpointError(
                    f"{path}: no *.safetensors files; moefuse reads safetensors checkpoints only "
                    "(save them with save_pretrained(..., safe_serialization=True))"
                )
        for name in shard_names:
            file = path / name
            if not file.exists():
                raise CheckpointError(f"{file}: missing shard named by {index.name}; download it again")
            try:
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        if key in ckpt.files:
                            raise CheckpointError(
                                f"{file}: {key} is also in {ckpt.files[key].name}; remove the stale shard"
                            )
                        tensor_slice = f.get_slice(key)
                        ckpt.files[key] = file
                        ckpt.shapes[key] = tuple(tensor_slice.get_shape())
                        ckpt.dtypes[key] = tensor_slice.get_dtype()
            except CheckpointError:
                raise
            except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
                raise CheckpointError(f"{file}: unreadable safetensors file ({e}); download it again") from e
        for key, name in weight_map.items():
            if ckpt.files.get(key, path / name) != path / name:
                raise CheckpointError(f"{index}: names {name} for {key}, which is in {ckpt.files[key].name}")
            if key not in ckpt.files:
                raise CheckpointError(
                    f"{path / name}: has no {key}, which {index.name} names; download it again"
                )
        return ckpt

    def torch_dtype(self, key: str) -> torch.dtype:
        if self.dtypes[key] not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{self.files[key]}: {key} has dtype {self.dtypes[key]}, which moefuse does not read"
            )
        return SAFETENSORS_DTYPES[self.dtypes[key]]

    def check_dtypes(self) -> None:
        """Raise :class:`CheckpointError` for a tensor of a dtype torch has no name for."""
        for key in self.dtypes:
            self.torch_dtype(key)

    def meta(self, key: str) -> torch.Tensor:
        """An empty tensor on the meta device with ``key``'s shape and dtype (planning without reading data)."""
        return torch.empty(self.shapes[key], dtype=self.torch_dtype(key), device="meta")

    def nbytes(self, key: str) -> int:
        return math.prod(self.shapes[key]) * self.torch_dtype(key).itemsize

    def _file(self, key: str):
        file = self.files[key]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def close(self) -> None:
        """Close the open files (their mapped pages leave the process's memory)."""
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()
        self._mapped = 0

    def tensor(self, key: str) -> torch.Tensor:
        """Tensor ``key`` whole."""
        tensor = self._file(key).get_tensor(key)
        self._account(tensor.nbytes)
        return tensor

    def read(self, piece: Piece) -> torch.Tensor:
        """The elements of ``piece``, flat (only those bytes are read from the file)."""
        shape = self.shapes[piece.name]
        if piece.start == 0 and piece.stop == math.prod(shape):
            return self.tensor(piece.name).reshape(-1)
        data = self._file(piece.name).get_slice(piece.name)[piece_index(shape, piece.start, piece.stop)]
        self._account(data.nbytes)
        return data.reshape(-1)

    def read_chunks(self, pieces: list[Piece]) -> Iterator[torch.Tensor]:
        """The elements of ``pieces`` in order, flat, in chunks of at most about :data:`READ_CHUNK_BYTES`."""
        for piece in pieces:
            shape, itemsize = self.shapes[piece.name], self.torch_dtype(piece.name).itemsize
            for chunk in row_chunks(shape, piece, itemsize):
                yield self.read(chunk)

    def _account(self, nbytes: int) -> None:
        self._mapped += nbytes
        if self._mapped > _MAPPED_BYTES_BEFORE_CLOSE:
            self.close()


class DerivedCheckpoint(Checkpoint):
    """A checkpoint whose tensors are ``source``'s, except some computed from it a group at a time (one MoE
    block's LoRA factors). Layouts whose tensors are no plain copies of another layout's (PEFT's
    ``target_parameters``: experts interleaved with ranks, gate and up sharing one factor) are read and written
    through one, so that planning and streaming stay those of the copy-only layouts.

    ``groups`` maps each computed name to a function returning its whole group ``{name: tensor}``; the last group
    is kept, so reading a group's tensors one after the other computes it once."""

    def __init__(
        self,
        source: Checkpoint,
        shapes: dict[str, tuple[int, ...]],
        dtypes: dict[str, str],
        groups: dict[str, Callable[[], dict[str, torch.Tensor]]],
    ):
        # A computed tensor is named as in the source's first file (adapters have one), for messages and counts.
        first = next(iter(source.files.values()), source.path)
        files = {name: source.files.get(name, first) for name in shapes}
        super().__init__(source.path, files, shapes, dtypes)
        self.source, self.groups = source, groups
        self._cached: tuple[Callable, dict[str, torch.Tensor]] | None = None

    def tensor(self, key: str) -> torch.Tensor:
        make = self.groups.get(key)
        if make is None:
            return self.source.tensor(key)
        if self._cached is None or self._cached[0] is not make:
            self._cached = (make, make())
        return self._cached[1][key]

    def read(self, piece: Piece) -> torch.Tensor:
        if piece.name not in self.groups:
            return self.source.read(piece)
        return self.tensor(piece.name).reshape(-1)[piece.start : piece.stop]

    def close(self) -> None:
        self.source.close()
        self._cached = None
