"""Writing a converted checkpoint safely, a piece at a time.

The output is planned from the input's headers alone (:func:`~.layouts.plan_conversion`), cut into shards by
huggingface_hub's ``split_torch_state_dict_into_shards``, and each shard is written as a safetensors file whose
header is known before any data: the tensors' bytes are then appended piece by piece as they are read. (The
safetensors library's writers take every tensor of a file in memory at once; this one never holds more than
one piece of a few MiB, so peak RAM does not depend on the model's or the shard's size.) Everything goes into a
temporary folder beside the destination, is checked against the plan (every tensor, shape and dtype), and only
then renamed into place.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from tqdm.auto import tqdm

from .checkpoint import SAFETENSORS_DTYPES, Checkpoint, CheckpointError
from .layouts import Planned


def check_destination(in_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse a destination that is, holds or lies inside the input, or that has files (unless ``overwrite``)."""
    source, target = in_dir.resolve(), out_dir.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise CheckpointError(
            f"{out_dir}: the output folder overlaps the input {in_dir}; choose a folder outside it"
        )
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise CheckpointError(
            f"{out_dir}: exists and is not empty; choose another folder or pass --overwrite"
        )


@contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """A temporary folder in ``out_dir``'s parent that replaces ``out_dir`` when the block exits cleanly, and is
    removed when it raises."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists() or out_dir.is_symlink():
        # Move the old output aside first, so that a failure leaves one complete folder, never a mix.
        retired = staging.with_suffix(".old")
        out_dir.rename(retired)
        staging.rename(out_dir)
        shutil.rmtree(retired) if retired.is_dir() else retired.unlink()
    else:
        staging.rename(out_dir)


def planned_nbytes(planned: Planned) -> int:
    return math.prod(planned.shape) * SAFETENSORS_DTYPES[planned.dtype].itemsize


def _write_safetensors(
    path: Path, names: list[str], plan: dict[str, Planned], source: Checkpoint, metadata: dict, bar: tqdm
) -> None:
    """A safetensors file of ``names`` (safetensors' format: little-endian u64 header size, JSON header padded
    with spaces to 8 bytes, the tensors' bytes back to back), written piece by piece from ``source``."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in names:
        size = planned_nbytes(plan[name])
        header[name] = {
            "dtype": plan[name].dtype,
            "shape": list(plan[name].shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in names:
            written = 0
            for chunk in source.read_chunks(plan[name].pieces):
                f.write(chunk.view(torch.uint8).numpy().data)
                written += chunk.nbytes
                bar.update(chunk.nbytes)
            if written != planned_nbytes(
                plan[name]
            ):  # a plan whose pieces do not add up: a bug, never data loss
                raise RuntimeError(f"{name}: wrote {written} bytes, planned {planned_nbytes(plan[name])}")
    source.close()


def write_shards(
    plan: dict[str, Planned],
    source: Checkpoint,
    out_dir: Path,
    *,
    max_shard_size: int | str,
    filename_pattern: str = "model{suffix}.safetensors",
    index_name: str = "model.safetensors.index.json",
    metadata: dict[str, str] | None = None,
    progress: bool = True,
) -> list[str]:
    """Write the tensors of ``plan``, read from ``source``, into safetensors shards of at most
    ``max_shard_size`` in ``out_dir``, with an index when there are several. Returns the shard file names."""
    metas = {
        name: torch.empty(p.shape, dtype=SAFETENSORS_DTYPES[p.dtype], device="meta")
        for name, p in plan.items()
    }
    split = split_torch_state_dict_into_shards(
        metas, filename_pattern=filename_pattern, max_shard_size=max_shard_size
    )
    metadata = {"format": "pt", **(metadata or {})}
    total = sum(planned_nbytes(p) for p in plan.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress) as bar:
        for filename, names in split.filename_to_tensors.items():
            _write_safetensors(out_dir / filename, names, plan, source, metadata, bar)
    if split.is_sharded:
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        (out_dir / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(split.filename_to_tensors)


def verify_written(out_dir: Path, plan: dict[str, Planned], index_name: str) -> Checkpoint:
    """Re-open ``out_dir`` from its headers and check every planned tensor is there with its shape and dtype."""
    written = Checkpoint.open(out_dir, index_name)
    for name, planned in plan.items():
        if name not in written.shapes:
            raise CheckpointError(f"{out_dir}: {name} was not written; the disk may be full, convert again")
        if written.shapes[name] != tuple(planned.shape) or written.dtypes[name] != planned.dtype:
            raise CheckpointError(
                f"{out_dir}: {name} written as {written.dtypes[name]}{list(written.shapes[name])}, expected "
                f"{planned.dtype}{list(planned.shape)}; convert again"
            )
    extra = set(written.shapes) - set(plan)
    if extra:
        raise CheckpointError(
            f"{out_dir}: unexpected tensor {sorted(extra)[0]}; convert again into an empty folder"
        )
    return written


# Weights and training state held in the input's layout: converting them is no plain copy.
_WEIGHT_FILES = re.compile(
    r"(\.safetensors|\.index\.json|\.gguf|\.h5|\.msgpack|\.ckpt"
    r"|^(pytorch_model|model|adapter_model|consolidated)\b.*\.(bin|pt|pth))$"
)
# Training state that depends on the parameters' layout (HF Trainer, DeepSpeed): not converted by a folder
# conversion; see moefuse.convert.convert_optimizer_state.
OPTIMIZER_FILES = re.compile(r"^(optimizer\.(pt|bin)|global_step\d+)$")


def copy_side_files(in_dir: Path, out_dir: Path, rewritten: tuple[str, ...]) -> list[str]:
    """Copy the input's other files (tokenizer, generation config, chat template, README, ...) but the weight
    files and the ``rewritten`` ones. Returns what was left behind: optimizer states and folders."""
    left = []
    for file in sorted(in_dir.iterdir()):
        if file.name in rewritten or _WEIGHT_FILES.search(file.name):
            continue
        if OPTIMIZER_FILES.match(file.name) or not file.is_file():
            left.append(file.name)
            continue
        shutil.copy2(file, out_dir / file.name)
    return left
