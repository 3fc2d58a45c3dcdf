"""Layouts of MoE expert weights and of LoRA adapters on experts: names, detection, and conversion plans.

Model layouts (``{p}`` is what holds the experts module: a block's MoE prefix, e.g. ``model.layers.3.mlp``, or
for Gemma 4 the decoder layer, ``model.layers.3``; E experts, hidden H, expert intermediate I):

``per_expert``       ``{p}.experts.{e}.gate_proj.weight [I, H]``, ``...up_proj.weight [I, H]``,
                     ``...down_proj.weight [H, I]``: the Hub layout that vLLM, SGLang and llama.cpp read.
``transformers``     ``{p}.experts.gate_up_proj [E, 2I, H]`` (each expert's gate rows, then its up rows),
                     ``{p}.experts.down_proj [E, H, I]``: Transformers 5.x's in-memory layout.
``qwen3_moe_fused``  ``{p}.gate_proj.weight [E, I, H]``, ``{p}.up_proj.weight``, ``{p}.down_proj.weight [E, H, I]``:
                     transformers-qwen3-moe-fused.
``veomni``           ``{p}.experts.gate_proj [E, I, H]``, ``{p}.experts.up_proj``, ``{p}.experts.down_proj [E, H, I]``:
                     VeOmni and the Qwen3-30B-A3B-fused EP model card.
``mixtral``          ``{s}.block_sparse_moe.experts.{e}.w1.weight [I, H]`` (gate), ``...w3.weight`` (up),
                     ``...w2.weight [H, I]`` (down), where ``{p}`` is ``{s}.mlp``: Mixtral's per-expert names (also
                     PhiMoE's and MiniMax's), on the Hub and as Transformers 5 saves these models. The block's other
                     tensors (the router) move between ``{s}.block_sparse_moe.`` and ``{p}.`` with it.

LoRA layouts (PEFT adapters; ``{f}`` is ``gate_proj``, ``up_proj`` or ``down_proj``, whose weight is
``[out, in]``; an adapter name may follow ``lora_A``/``lora_B`` in parameter names, as in a live PEFT model):

``per_expert``       ``{p}.experts.{e}.{f}.lora_A.weight [r, in]``, ``....lora_B.weight [out, r]``: PEFT on
                     per-expert ``nn.Linear`` experts (Transformers 4, Unsloth), read by vLLM.
``mixtral``          ``{s}.block_sparse_moe.experts.{e}.w1.lora_A.weight [r, in]`` ...: PEFT on Transformers 4's
                     Mixtral-style experts (``w1``/``w3``/``w2`` for gate/up/down).
``fused``            ``{p}.experts.{f}.lora_A.weight [E, r, in]``, ``....lora_B.weight [E, out, r]``: moefuse's
                     LoRA on fused experts (:mod:`moefuse.lora`).
``qwen3_moe_fused``  ``{p}.{f}.lora_A.weight [E, r, in]``, ``{p}.{f}.lora_B.weight [E, out, r]``:
                     transformers-qwen3-moe-fused.
``peft_target_parameters``
                     ``{p}.experts.base_layer.lora_A.weight [E*r, H]``, ``....lora_B.weight [2I, E*r]`` (gate_up_proj)
                     and ``{p}.experts.lora_A.weight [E*r, I]``, ``....lora_B.weight [H, E*r]`` (down_proj): PEFT's
                     ``LoraConfig(target_parameters=[...])`` on Transformers 5's fused experts. Its factors are no
                     plain regrouping of the others' (see :mod:`.peft_params`): it is read and written through a
                     view in the ``fused`` layout (:data:`PLANNED_AS`).

Every layout stores the same matrices, expert ``e``'s weight (or LoRA factor) of each projection, as row-major
bytes; layouts differ only in how they group them into tensors. A conversion plan (:func:`plan_conversion`)
says for every output tensor which contiguous element ranges (:class:`Piece`) of which input tensors it is made
of, in order: copying those ranges one after the other gives the output bit for bit, and never needs more in
memory than one range.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from .checkpoint import SAFETENSORS_DTYPES, Checkpoint, CheckpointError, Piece

MODEL, LORA = "model", "lora"
LAYOUTS = ("per_expert", "transformers", "qwen3_moe_fused", "veomni", "mixtral")
FUSED_LAYOUTS = ("transformers", "qwen3_moe_fused", "veomni")
LORA_LAYOUTS = ("per_expert", "fused", "qwen3_moe_fused", "peft_target_parameters", "mixtral")
PER_EXPERT_LAYOUTS = ("per_expert", "mixtral")  # one 2-D tensor per expert and projection
# Layouts planned as another one: conversions read them through a view in that layout and write them from one.
PLANNED_AS = {"peft_target_parameters": "fused"}
_PROJECTIONS = ("gate", "up", "down")
# Mixtral's names: w1, w3, w2 for gate, up, down, in a block called block_sparse_moe instead of mlp.
MIXTRAL_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}
_FROM_MIXTRAL = {w: p for p, w in MIXTRAL_NAMES.items()}
MIXTRAL_BLOCK, BLOCK = ".block_sparse_moe", ".mlp"

_LORA_ITEM = r"(?P<item>(?:gate|up|down)_proj\.lora_[AB](?:\.[\w-]+)?)"
_PATTERNS = {
    # The experts module sits in the MLP block (<...>.mlp.experts) or, as Gemma 4's, on the decoder layer.
    (MODEL, "per_expert"): re.compile(
        r"^(?P<p>.+)\.experts\.(?P<e>\d+)\.(?P<item>gate|up|down)_proj\.weight$"
    ),
    (MODEL, "transformers"): re.compile(r"^(?P<p>.+)\.experts\.(?P<item>gate_up|down)_proj$"),
    (MODEL, "veomni"): re.compile(r"^(?P<p>.+)\.experts\.(?P<item>gate|up|down)_proj$"),
    (MODEL, "qwen3_moe_fused"): re.compile(r"^(?P<p>.+\.mlp)\.(?P<item>gate|up|down)_proj\.weight$"),
    (LORA, "per_expert"): re.compile(rf"^(?P<p>.+)\.experts\.(?P<e>\d+)\.{_LORA_ITEM}\.weight$"),
    (LORA, "fused"): re.compile(rf"^(?P<p>.+)\.experts\.{_LORA_ITEM}\.weight$"),
    (LORA, "qwen3_moe_fused"): re.compile(rf"^(?P<p>.+\.mlp)\.{_LORA_ITEM}\.weight$"),
    # ``item`` is the factor with its nesting: one ``base_layer.`` per ParamWrapper wrapped around this one.
    (LORA, "peft_target_parameters"): re.compile(
        r"^(?P<p>.+)\.experts\.(?P<item>(?:base_layer\.)*lora_[AB])\.weight$"
    ),
    (MODEL, "mixtral"): re.compile(
        r"^(?P<p>.+)\.block_sparse_moe\.experts\.(?P<e>\d+)\.(?P<item>w[123])\.weight$"
    ),
    (LORA, "mixtral"): re.compile(
        r"^(?P<p>.+)\.block_sparse_moe\.experts\.(?P<e>\d+)\.(?P<item>w[123]\.lora_[AB](?:\.[\w-]+)?)\.weight$"
    ),
}


@dataclass(frozen=True)
class _Found:
    """A tensor of experts as a layout names it, in the common terms: what holds the experts (``<...>.mlp``, or a
    decoder layer), the item (``gate``/``gate_up``/... or, for LoRA, ``gate_proj.lora_A[.adapter]``) and the
    expert (per-expert layouts)."""

    prefix: str
    item: str
    expert: int | None


def _parse(kind: str, layout: str, name: str) -> _Found | None:
    m = _PATTERNS[kind, layout].match(name)
    if m is None:
        return None
    prefix, item, expert = m["p"], m["item"], m.groupdict().get("e")
    if layout == "mixtral":
        prefix += BLOCK
        weight, dot, rest = item.partition(".")
        item = _FROM_MIXTRAL[weight] + ("" if kind == MODEL else "_proj" + dot + rest)
    return _Found(prefix, item, None if expert is None else int(expert))


def mixtral_stem(prefix: str) -> str:
    """A block's prefix (``<...>.mlp``) without the block's name, to which Mixtral's names add theirs."""
    if not prefix.endswith(BLOCK):
        raise CheckpointError(
            f"{prefix}: the mixtral layout names a block <...>{MIXTRAL_BLOCK}, which stands for <...>{BLOCK}; "
            "this block has another name: convert to per_expert instead"
        )
    return prefix.removesuffix(BLOCK)


def lora_layout_for(layout: str) -> str:
    """The LoRA layout that goes with a model layout (moefuse's ``fused`` adapters sit on Transformers' and
    VeOmni's fused experts alike); LoRA layout names are returned as they are."""
    if layout in LORA_LAYOUTS:
        return layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS + ('fused',))}")
    return "fused" if layout in ("transformers", "veomni") else layout


def _stored_name(kind: str, layout: str, prefix: str, item: str, expert: int | None = None) -> str:
    if layout == "mixtral":
        projection, _, rest = item.partition("_proj") if kind == LORA else (item, "", "")
        return (
            f"{mixtral_stem(prefix)}{MIXTRAL_BLOCK}.experts.{expert}.{MIXTRAL_NAMES[projection]}{rest}.weight"
        )
    if kind == MODEL:
        if layout == "per_expert":
            return f"{prefix}.experts.{expert}.{item}_proj.weight"
        if layout == "qwen3_moe_fused":
            if not prefix.endswith(BLOCK):
                raise CheckpointError(
                    f"{prefix}: the qwen3_moe_fused layout names experts by their MLP block (<...>{BLOCK}."
                    "gate_proj.weight), and these experts sit outside one; convert to transformers or veomni"
                )
            return f"{prefix}.{item}_proj.weight"
        return f"{prefix}.experts.{item}_proj"  # transformers (item gate_up or down), veomni
    if layout == "per_expert":
        return f"{prefix}.experts.{expert}.{item}.weight"
    if layout == "qwen3_moe_fused":
        return f"{prefix}.{item}.weight"
    return f"{prefix}.experts.{item}.weight"


def names_expert(name: str, kind: str, layout: str) -> bool:
    """Whether ``name`` is how ``layout`` names a tensor of experts (whatever its shape)."""
    return _PATTERNS[kind, layout].match(name) is not None


def _matching(shapes: Mapping[str, tuple[int, ...]], kind: str, layout: str) -> Iterator[tuple[str, _Found]]:
    """Tensors named as ``layout`` stores experts: per-expert matrices are 2-D, stacks 3-D (dense MLPs also
    have ``mlp.gate_proj.weight``, 2-D)."""
    ndim = 2 if layout in (*PER_EXPERT_LAYOUTS, "peft_target_parameters") else 3
    for name, shape in shapes.items():
        found = _parse(kind, layout, name)
        if found is not None and len(shape) == ndim:
            yield name, found


def _detect(shapes: Mapping[str, tuple[int, ...]], kind: str, where: object) -> str | None:
    layouts = LAYOUTS if kind == MODEL else LORA_LAYOUTS
    # Transformers' and VeOmni's layouts both name experts.down_proj: tell them apart by the gate tensors.
    found = [
        layout for layout in layouts if any(f.item != "down" for _, f in _matching(shapes, kind, layout))
    ]
    if len(found) > 1:
        examples = [next(_matching(shapes, kind, layout))[0] for layout in found]
        raise CheckpointError(
            f"{where}: mixes expert layouts {' and '.join(found)} ({', '.join(examples)}); convert from a "
            "checkpoint in one layout"
        )
    return found[0] if found else None


def detect_layout(shapes: Mapping[str, tuple[int, ...]], where: object = "checkpoint") -> str | None:
    """The expert layout of a model checkpoint given its tensor names and shapes; ``None`` when it holds no
    experts. Raises :class:`CheckpointError` for a checkpoint that mixes layouts."""
    return _detect(shapes, MODEL, where)


def detect_lora_layout(shapes: Mapping[str, tuple[int, ...]], where: object = "adapter") -> str | None:
    """The LoRA layout of an adapter given its tensor names and shapes; ``None`` without LoRA on experts."""
    return _detect(shapes, LORA, where)


@dataclass
class ExpertBlock:
    """The experts of one MoE block (``prefix`` e.g. ``model.layers.3.mlp``) as stored in a checkpoint.

    ``matrices`` maps each projection (``gate``/``up``/``down``; for LoRA ``gate_proj.lora_A`` ...) to the
    shape of one expert's matrix, in storage order; ``names`` are the tensors holding them."""

    prefix: str
    num_experts: int
    matrices: dict[str, tuple[int, int]]
    names: list[str]


def _item_label(kind: str, item: str) -> str:
    return f"{item}_proj" if kind == MODEL else item


def _item_order(kind: str, item: str) -> tuple:
    """Storage order: gate, up, down (for LoRA: by adapter name, then projection, then A before B)."""
    if kind == MODEL:
        return (("gate", "gate_up", "up", "down").index(item),)
    proj, factor, *adapter = item.split(".")
    return (adapter, _PROJECTIONS.index(proj.removesuffix("_proj")), factor)


def find_blocks(
    shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, object], kind: str, layout: str, where: object
) -> list[ExpertBlock]:
    """Every MoE block stored in ``layout``, checked: experts 0..E-1 of every projection, one shape per
    projection, one dtype per block, projections that fit together. ``where`` (a path) starts error messages.
    A layout of :data:`PLANNED_AS` is looked for in its view layout (``shapes`` are then the view's)."""
    layout = PLANNED_AS.get(layout, layout)
    per_expert = layout in PER_EXPERT_LAYOUTS
    # prefix -> stored item -> expert (-1 for a stack) -> shape
    found: dict[str, dict[str, dict[int, tuple[int, ...]]]] = {}
    names: dict[str, list[str]] = {}
    for name, f in _matching(shapes, kind, layout):
        names.setdefault(f.prefix, []).append(name)
        by_expert = found.setdefault(f.prefix, {}).setdefault(f.item, {})
        by_expert[f.expert if per_expert else -1] = shapes[name]
    blocks = []
    for prefix, stored in found.items():
        num_experts = max(len(by_expert) if per_expert else by_expert[-1][0] for by_expert in stored.values())
        counts = {
            item: (sorted(by_expert) if per_expert else list(range(by_expert[-1][0])))
            for item, by_expert in stored.items()
        }
        if any(experts != list(range(num_experts)) for experts in counts.values()):
            details = []
            for item, experts in sorted(counts.items(), key=lambda kv: _item_order(kind, kv[0])):
                missing = sorted(set(range(num_experts)) - set(experts))
                details.append(
                    f"{_item_label(kind, item)}: {len(experts)} experts"
                    + (f" (missing {missing})" if missing else "")
                )
            raise CheckpointError(
                f"{where}: mismatched expert counts in {prefix} ({', '.join(details)}); every projection needs "
                f"experts 0..{num_experts - 1}, download or convert the checkpoint again"
            )
        block_dtypes = {str(dtypes[name]) for name in names[prefix]}
        if len(block_dtypes) != 1:
            raise CheckpointError(
                f"{where}: the experts of {prefix} mix dtypes {sorted(block_dtypes)}; cast them to one dtype first"
            )
        matrices: dict[str, tuple[int, int]] = {}
        for item, by_expert in stored.items():
            item_shapes = {shape[-2:] for shape in by_expert.values()}
            if len(item_shapes) != 1:
                raise CheckpointError(
                    f"{where}: the experts of {prefix} have {_item_label(kind, item)} matrices of different "
                    f"shapes {sorted(item_shapes)}; only experts of one shape stack"
                )
            rows, cols = item_shapes.pop()
            if item == "gate_up":
                if rows % 2:
                    raise CheckpointError(
                        f"{where}: {prefix}.experts.gate_up_proj has {rows} rows, not gate and up rows of one size"
                    )
                matrices["gate"] = matrices["up"] = (rows // 2, cols)
            else:
                matrices[item] = (rows, cols)
        blocks.append(
            ExpertBlock(prefix, num_experts, _checked(where, kind, layout, prefix, matrices), names[prefix])
        )
    # Other tensors of the experts (quantization scales, biases, DoRA magnitudes) would stay in the old layout
    # beside the converted weights: refuse rather than write a checkpoint no loader reads right.
    held = {name for block in blocks for name in block.names}
    stored_prefixes = {name.split(".experts.")[0] for name in held if ".experts." in name}
    for name in shapes:
        prefix = name.split(".experts.")[0] if ".experts." in name else None
        if prefix in stored_prefixes and name not in held:
            what = "gate/up/down weight" if kind == MODEL else "gate/up/down LoRA factor"
            raise CheckpointError(
                f"{where}: {name} belongs to the experts but is no {what} moefuse converts (quantization "
                "scales, biases and DoRA are not supported); convert an unquantized checkpoint"
            )
    return blocks


def _checked(
    where: object, kind: str, layout: str, prefix: str, matrices: dict
) -> dict[str, tuple[int, int]]:
    """``matrices`` in storage order, after checking the projections fit together."""
    if kind == MODEL:
        missing = [p for p in _PROJECTIONS if p not in matrices]
        if missing:
            stored = "gate_up" if layout == "transformers" and missing[0] != "down" else missing[0]
            raise CheckpointError(
                f"{where}: {prefix} has no {_stored_name(kind, layout, prefix, stored, 0)}; the checkpoint is "
                "incomplete, download or convert it again"
            )
        (inter, hidden), up, down = matrices["gate"], matrices["up"], matrices["down"]
        if up != (inter, hidden) or down != (hidden, inter):
            raise CheckpointError(
                f"{where}: the experts of {prefix} have gate {list(matrices['gate'])}, up {list(up)}, down "
                f"{list(down)}, not [I, H], [I, H], [H, I]; transposed or interleaved experts (e.g. GPT-OSS) are "
                "not supported"
            )
        return {p: matrices[p] for p in _PROJECTIONS}
    for item, (rows, cols) in matrices.items():
        other = item.replace("lora_A", "lora_B") if ".lora_A" in item else item.replace("lora_B", "lora_A")
        if other not in matrices:
            raise CheckpointError(
                f"{where}: {prefix} has {item} but no {other}; the adapter is incomplete, save it again"
            )
        rank = cols if ".lora_B" in item else rows
        other_rank = matrices[other][0] if ".lora_B" in item else matrices[other][1]
        if rank != other_rank:
            raise CheckpointError(
                f"{where}: {prefix}: {item} and {other} have different ranks ({rank}, {other_rank})"
            )
    return {item: matrices[item] for item in sorted(matrices, key=lambda item: _item_order(kind, item))}


def stored_tensors(kind: str, layout: str, block: ExpertBlock) -> list[tuple[str, tuple[int, ...], list]]:
    """The tensors that store ``block`` in ``layout``: ``(name, shape, [(projection, expert), ...])``, the
    matrices each holds in byte order."""
    experts, matrices = range(block.num_experts), block.matrices
    if layout in PER_EXPERT_LAYOUTS:
        return [
            (_stored_name(kind, layout, block.prefix, item, e), shape, [(item, e)])
            for e in experts
            for item, shape in matrices.items()
        ]
    if layout == "transformers":
        if kind != MODEL:
            raise ValueError("LoRA adapters have no 'transformers' layout; use 'fused'")
        (inter, hidden), down = matrices["gate"], matrices["down"]
        return [
            (
                _stored_name(kind, layout, block.prefix, "gate_up"),
                (len(experts), 2 * inter, hidden),
                [(p, e) for e in experts for p in ("gate", "up")],
            ),
            (
                _stored_name(kind, layout, block.prefix, "down"),
                (len(experts), *down),
                [("down", e) for e in experts],
            ),
        ]
    return [
        (_stored_name(kind, layout, block.prefix, item), (len(experts), *shape), [(item, e) for e in experts])
        for item, shape in matrices.items()
    ]


@dataclass
class Planned:
    """One output tensor of a conversion: its shape, dtype (as the input names it) and the input pieces that
    make up its data, in order."""

    shape: tuple[int, ...]
    dtype: object
    pieces: list[Piece]

    def rows(self, start: int, stop: int) -> Planned:
        """Rows ``start:stop`` of dimension 0 (e.g. a range of experts): only the pieces, or parts of pieces,
        that hold them."""
        row = math.prod(self.shape[1:])
        first, last = start * row, stop * row
        pieces, offset = [], 0
        for piece in self.pieces:
            size = piece.stop - piece.start
            a, b = max(first, offset), min(last, offset + size)
            if a < b:
                pieces.append(Piece(piece.name, piece.start + a - offset, piece.start + b - offset))
            offset += size
        return Planned((stop - start, *self.shape[1:]), self.dtype, pieces)


def _merged(pieces: list[Piece]) -> list[Piece]:
    """Adjacent pieces of one tensor joined, so that e.g. a stack copied whole is one read."""
    out: list[Piece] = []
    for piece in pieces:
        if out and out[-1].name == piece.name and out[-1].stop == piece.start:
            out[-1] = Piece(piece.name, out[-1].start, piece.stop)
        else:
            out.append(piece)
    return out


def plan_conversion(
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, object],
    kind: str,
    in_layout: str,
    out_layout: str,
    blocks: list[ExpertBlock],
    where: object,
) -> dict[str, Planned]:
    """``{output name: Planned}`` storing every tensor of ``shapes`` with ``blocks`` moved from ``in_layout`` to
    ``out_layout``: the input's order, each block's tensors where its first tensor was; other tensors as they
    are. A layout of :data:`PLANNED_AS` is planned as its view layout (``shapes`` and ``blocks`` are then the
    view's)."""
    in_layout, out_layout = PLANNED_AS.get(in_layout, in_layout), PLANNED_AS.get(out_layout, out_layout)
    block_of = {name: block for block in blocks for name in block.names}
    renamed = _block_renames(blocks, in_layout, out_layout)
    plan: dict[str, Planned] = {}
    for name, shape in shapes.items():
        block = block_of.get(name)
        if block is None:
            out_name = _renamed(name, renamed)
            if out_name in plan:
                raise CheckpointError(f"{where}: {name} would be written as {out_name}, which is taken")
            plan[out_name] = Planned(tuple(shape), dtypes[name], [Piece(name, 0, math.prod(shape))])
            continue
        if name != block.names[0]:
            continue
        located: dict[tuple[str, int], Piece] = {}
        for stored, _, content in stored_tensors(kind, in_layout, block):
            offset = 0
            for item, e in content:
                size = math.prod(block.matrices[item])
                located[item, e] = Piece(stored, offset, offset + size)
                offset += size
        for out_name, out_shape, content in stored_tensors(kind, out_layout, block):
            if out_name in plan or (out_name in shapes and block_of.get(out_name) is not block):
                raise CheckpointError(
                    f"{where}: {out_name} would hold the experts of {block.prefix} in the {out_layout} layout, "
                    "but that name is taken by another tensor; convert to another layout"
                )
            plan[out_name] = Planned(out_shape, dtypes[name], _merged([located[c] for c in content]))
    return plan


def _block_renames(blocks: list[ExpertBlock], in_layout: str, out_layout: str) -> dict[str, str]:
    """``{block name in the input: in the output}`` where the layouts name blocks differently (Mixtral's
    ``<...>.block_sparse_moe`` against ``<...>.mlp``): the block's other tensors (the router) move with it."""
    if (in_layout == "mixtral") == (out_layout == "mixtral"):
        return {}
    pairs = [(mixtral_stem(block.prefix) + MIXTRAL_BLOCK, block.prefix) for block in blocks]
    return dict(pairs) if in_layout == "mixtral" else {canonical: mixtral for mixtral, canonical in pairs}


def _renamed(name: str, renames: dict[str, str]) -> str:
    if renames:
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:i])
            if head in renames:
                return renames[head] + name[len(head) :]
    return name


def read_planned(ckpt: Checkpoint, planned: Planned) -> torch.Tensor:
    """The tensor ``planned`` describes, read from ``ckpt``."""
    out = torch.empty(planned.shape, dtype=SAFETENSORS_DTYPES[planned.dtype])
    flat, offset = out.view(-1), 0
    for chunk in ckpt.read_chunks(planned.pieces):
        flat[offset : offset + chunk.numel()] = chunk
        offset += chunk.numel()
    return out


class TransformersLayoutView(Mapping):
    """A read-only ``{name: tensor}`` view of a model checkpoint in any layout, in Transformers' layout. Tensors
    are read from disk when asked for, so a model can be loaded from it one tensor at a time."""

    def __init__(self, ckpt: Checkpoint, layout: str):
        blocks = find_blocks(ckpt.shapes, ckpt.dtypes, MODEL, layout, ckpt.path)
        self._ckpt = ckpt
        self._plan = plan_conversion(
            ckpt.shapes, ckpt.dtypes, MODEL, layout, "transformers", blocks, ckpt.path
        )

    def __getitem__(self, key: str) -> torch.Tensor:
        return read_planned(self._ckpt, self._plan[key])

    def read(self, key: str, rows: range | None = None) -> torch.Tensor:
        """Tensor ``key``, or only rows ``rows`` of its first dimension (e.g. one rank's experts): reads just
        those bytes from disk."""
        planned = self._plan[key]
        return read_planned(self._ckpt, planned if rows is None else planned.rows(rows.start, rows.stop))

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)
