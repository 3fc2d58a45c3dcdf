"""PEFT ``target_parameters`` LoRA on Transformers 5's fused experts, read and written through moefuse's ``fused``
layout.

``LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])`` wraps each targeted
parameter ``[E, out, in]`` in a ``lora.ParamWrapper``. What PEFT >= 0.19.1 saves for it at rank ``r`` (read from
PEFT 0.21's ``ParamWrapper.update_layer`` and ``get_delta_weight``, and checked by saving one):

- ``lora_A.weight [E*r, in]``, expert-major: expert ``e``'s ``A_e`` is rows ``e*r:(e+1)*r``;
- ``lora_B.weight [out, E*r]``, rank-major: expert ``e``'s ``B_e`` is columns ``e, e+E, e+2E, ...``
  (``B.reshape(out, r, E)[..., e]``);
- the delta of expert ``e`` is ``scaling * B_e @ A_e``, as PEFT's per-expert LoRA on ``nn.Linear`` experts.

Two parameters of one module are nested wrappers: the one the experts module registers first (``gate_up_proj``
in Qwen3-MoE) is inside, saved as ``experts.base_layer.lora_A.weight``; the other as ``experts.lora_A.weight``.
Which is which is told by the shapes (gate_up's B has twice the rows of down's A columns), never by the order.

``gate_up_proj`` has one ``A_e`` for gate and up; its ``B_e`` holds the I gate rows, then the I up rows. Split into
gate and up factors it is exact at the same rank and alpha. The other way is exact at rank r only when gate's and
up's A factors are equal; otherwise at rank 2r (A stacked ``[A_gate; A_up]``, B block-diagonal) with alpha doubled,
so ``alpha / r`` and every product stay as they were; the rank is stated in the written ``rank_pattern``.

PEFT < 0.19.1 did not swap ``in`` and ``out`` for experts stored ``[E, out, in]`` (``lora_A [E*r, out]``,
``lora_B [in, E*r]``): such adapters are refused, naming what was found.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from packaging.version import InvalidVersion, Version

from .checkpoint import Checkpoint, CheckpointError, DerivedCheckpoint, Piece
from .layouts import _PATTERNS, LORA, ExpertBlock, Planned, read_planned

PEFT_LAYOUT = "peft_target_parameters"
PARAMS = ("gate_up_proj", "down_proj")
SWAPPED_SINCE = Version("0.19.1")  # PEFT's fix e84dd8f ("How to swapped in/out features for transposed")
_PEFT_PREFIX = "base_model.model."


def _peft_name(prefix: str, depth: int, factor: str) -> str:
    return f"{prefix}.experts.{'base_layer.' * depth}lora_{factor}.weight"


def _fused_name(prefix: str, proj: str, factor: str) -> str:
    return f"{prefix}.experts.{proj}.lora_{factor}.weight"


def module_key(prefix: str) -> str:
    """The experts module's name as PEFT matches ``rank_pattern`` keys against it (``model.layers.0.mlp.experts``)."""
    return f"{prefix.removeprefix(_PEFT_PREFIX)}.experts"


def pattern_value(patterns: dict, key: str, default):
    """The value PEFT takes for module ``key`` from a ``rank_pattern`` / ``alpha_pattern``: the first key, in the
    dict's order, that matches the end of ``key`` as a regex (``peft.utils.other.get_pattern_key``)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def peft_version(config: dict) -> Version | None:
    try:
        return Version(str(config.get("peft_version") or "").partition("@")[0])
    except InvalidVersion:
        return None


def orientation(config: dict) -> str:
    """A line on the adapter's orientation for ``moefuse inspect``."""
    version = peft_version(config)
    return f"lora_A [E*r, in], lora_B [out, E*r] (PEFT >= {SWAPPED_SINCE}; written by {version or 'unknown'})"


# --- reading ----------------------------------------------------------------------------------------------


def _fits(gate_up: dict, down: dict) -> bool:
    """Whether factors ``{"A": shape, "B": shape}`` are gate_up's and down's in PEFT >= 0.19.1's orientation:
    gate_up A [E*r, H], B [2I, E*r]; down A [E*r, I], B [H, E*r]."""
    return gate_up["A"][1] == down["B"][0] and gate_up["B"][0] == 2 * down["A"][1]


def _fits_legacy(gate_up: dict, down: dict) -> bool:
    """The same in PEFT < 0.19.1's: gate_up A [E*r, 2I], B [H, E*r]; down A [E*r, H], B [I, E*r]."""
    return gate_up["B"][0] == down["A"][1] and gate_up["A"][1] == 2 * down["B"][0]


def _legacy_error(where: object, prefix: str, found: str, config: dict) -> CheckpointError:
    return CheckpointError(
        f"{where}: {prefix}: {found} are in the orientation PEFT < {SWAPPED_SINCE} wrote (lora_A [E*r, out], "
        f"lora_B [in, E*r]; adapter_config.json says peft_version {config.get('peft_version')}); moefuse reads "
        f"PEFT >= {SWAPPED_SINCE}'s lora_A [E*r, in], lora_B [out, E*r] only"
    )


def _params_of(
    prefix: str, factors: dict[int, dict[str, tuple[int, ...]]], config: dict, where: object
) -> dict[str, int]:
    """``{parameter name: nesting depth}`` of one experts module's wrapped parameters."""
    for depth, by_factor in factors.items():
        if set(by_factor) != {"A", "B"}:
            missing = "B" if "A" in by_factor else "A"
            raise CheckpointError(
                f"{where}: {prefix} has no {_peft_name(prefix, depth, missing)}; the adapter is incomplete, "
                "save it again"
            )
    shown = ", ".join(f"lora_{f} {list(s)}" for d in sorted(factors) for f, s in sorted(factors[d].items()))
    if sorted(factors) == [0, 1]:
        inner, outer = factors[1], factors[0]
        if _fits(inner, outer):
            return {"gate_up_proj": 1, "down_proj": 0}
        if _fits(outer, inner):
            return {"gate_up_proj": 0, "down_proj": 1}
        if _fits_legacy(inner, outer) or _fits_legacy(outer, inner):
            raise _legacy_error(where, prefix, shown, config)
        raise CheckpointError(
            f"{where}: {prefix}: the target_parameters factors ({shown}) are not gate_up_proj's and down_proj's "
            "of one experts module (gate_up [E*r, H], [2I, E*r]; down [E*r, I], [H, E*r]); not supported"
        )
    if sorted(factors) != [0]:
        raise CheckpointError(
            f"{where}: {prefix} has {len(factors)} nested target_parameters wrappers; moefuse converts "
            "gate_up_proj and down_proj only"
        )
    # One parameter: the shapes cannot tell its orientation, the PEFT version that wrote it can.
    named = {target.rpartition(".")[2] for target in config.get("target_parameters") or []} & set(PARAMS)
    version = peft_version(config)
    if len(named) != 1:
        raise CheckpointError(
            f"{where}: {prefix} has one target_parameters wrapper but adapter_config.json's target_parameters "
            f"{config.get('target_parameters')} name {len(named)} of {', '.join(PARAMS)}; cannot tell which it is"
        )
    if version is None or version < SWAPPED_SINCE:
        raise _legacy_error(where, prefix, shown, config)
    return {named.pop(): 0}


def _unpack(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``A [E*r, in]``, ``B [out, E*r]`` as fused stacks ``[E, r, in]``, ``[E, out, r]``."""
    return (
        a.reshape(num_experts, -1, a.shape[1]).contiguous(),
        b.reshape(b.shape[0], -1, num_experts).permute(2, 0, 1).contiguous(),
    )


def _pack(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused stacks ``[E, r, in]``, ``[E, out, r]`` as PEFT's ``A [E*r, in]``, ``B [out, E*r]``."""
    return a.reshape(-1, a.shape[2]).contiguous(), b.permute(1, 2, 0).reshape(b.shape[1], -1).contiguous()


def fused_view(ckpt: Checkpoint, config: dict, where: object) -> DerivedCheckpoint:
    """``ckpt`` (a ``peft_target_parameters`` adapter) with each experts module's factors replaced by moefuse's
    ``fused`` ones (gate_proj, up_proj, down_proj; ``[E, r, in]``, ``[E, out, r]``), computed when read."""
    pattern = _PATTERNS[LORA, PEFT_LAYOUT]
    found: dict[str, dict[int, dict[str, tuple[int, ...]]]] = {}
    for name, shape in ckpt.shapes.items():
        m = pattern.match(name)
        if m is not None and len(shape) == 2:
            depth, factor = m["item"].count("base_layer."), m["item"][-1]
            found.setdefault(m["p"], {}).setdefault(depth, {})[factor] = shape
    rank_pattern, default_rank = config.get("rank_pattern") or {}, config.get("r")
    replaced: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}  # first PEFT name -> fused name -> meta
    groups: dict[str, Callable[[], dict[str, torch.Tensor]]] = {}
    peft_names: set[str] = set()
    for prefix, factors in found.items():
        params = _params_of(prefix, factors, config, where)
        names = {p: {f: _peft_name(prefix, d, f) for f in "AB"} for p, d in params.items()}
        dtypes = {ckpt.dtypes[n] for by_factor in names.values() for n in by_factor.values()}
        if len(dtypes) != 1:
            raise CheckpointError(f"{where}: the experts LoRA of {prefix} mixes dtypes {sorted(dtypes)}")
        dtype = dtypes.pop()
        experts: dict[str, int] = {}
        for param, by_factor in names.items():
            (rows, cols), (out, cols_b) = ckpt.shapes[by_factor["A"]], ckpt.shapes[by_factor["B"]]
            rank = pattern_value(rank_pattern, f"{module_key(prefix)}.{param}", default_rank)
            if not isinstance(rank, int) or rank <= 0 or rows % rank or cols_b != rows:
                raise CheckpointError(
                    f"{where}: {prefix}: {param}'s lora_A {[rows, cols]} and lora_B {[out, cols_b]} are not "
                    f"[E*r, in] and [out, E*r] for the rank r={rank} adapter_config.json gives it"
                )
            experts[param] = rows // rank
        if len(set(experts.values())) != 1:
            raise CheckpointError(f"{where}: {prefix}: mismatched expert counts {experts} of its parameters")
        num_experts = experts.popitem()[1]
        meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for param, by_factor in names.items():
            (rows, cols), out = ckpt.shapes[by_factor["A"]], ckpt.shapes[by_factor["B"]][0]
            rank = rows // num_experts
            projs = (
                {"gate_proj": out // 2, "up_proj": out // 2}
                if param == "gate_up_proj"
                else {"down_proj": out}
            )
            for proj, proj_out in projs.items():
                meta[_fused_name(prefix, proj, "A")] = ((num_experts, rank, cols), dtype)
                meta[_fused_name(prefix, proj, "B")] = ((num_experts, proj_out, rank), dtype)

        def make(prefix=prefix, names=names, num_experts=num_experts) -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            for param, by_factor in names.items():
                a, b = _unpack(ckpt.tensor(by_factor["A"]), ckpt.tensor(by_factor["B"]), num_experts)
                if param == "down_proj":
                    out[_fused_name(prefix, "down_proj", "A")], out[_fused_name(prefix, "down_proj", "B")] = (
                        a,
                        b,
                    )
                    continue
                inter = b.shape[1] // 2
                for proj, rows in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, None))):
                    out[_fused_name(prefix, proj, "A")] = a  # one A for gate and up: both get it, exactly
                    out[_fused_name(prefix, proj, "B")] = b[:, rows].contiguous()
            return out

        block_names = [n for by_factor in names.values() for n in by_factor.values()]
        peft_names.update(block_names)
        replaced[min(block_names, key=list(ckpt.shapes).index)] = meta
        groups.update(dict.fromkeys(meta, make))
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for name, shape in ckpt.shapes.items():
        if name in replaced:
            for fused, (fused_shape, dtype) in replaced[name].items():
                shapes[fused], dtypes[fused] = fused_shape, dtype
        elif name not in peft_names:
            shapes[name], dtypes[name] = shape, ckpt.dtypes[name]
    return DerivedCheckpoint(ckpt, shapes, dtypes, groups)


# --- writing ----------------------------------------------------------------------------------------------


def packed(
    ckpt: Checkpoint, plan: dict[str, Planned], blocks: list[ExpertBlock], where: object
) -> tuple[DerivedCheckpoint, dict[str, Planned], dict[str, int]]:
    """The tensors of ``plan`` (a plan into the ``fused`` layout) with each block's fused factors replaced by PEFT's
    ``target_parameters`` ones: ``(checkpoint, plan copying it whole, {block prefix: gate_up_proj's rank})``."""
    replaced: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    groups: dict[str, Callable[[], dict[str, torch.Tensor]]] = {}
    fused_names: set[str] = set()
    gate_up_ranks: dict[str, int] = {}
    for block in blocks:
        prefix, num_experts, matrices = block.prefix, block.num_experts, block.matrices
        projs = [p for p in ("gate_proj", "up_proj", "down_proj") if f"{p}.lora_A" in matrices]
        if ("gate_proj" in projs) != ("up_proj" in projs):
            raise CheckpointError(
                f"{where}: {prefix} has LoRA on {' and '.join(projs)}; PEFT's gate_up_proj needs gate and up both"
            )
        if any(len(item.split(".")) > 2 for item in matrices):
            raise CheckpointError(
                f"{where}: {prefix}: adapter-named factors cannot be written as target_parameters"
            )
        names = {(p, f): _fused_name(prefix, p, f) for p in projs for f in "AB"}
        dtype = plan[names[projs[0], "A"]].dtype
        meta: dict[str, tuple[tuple[int, ...], str]] = {}
        shared = False
        depth = {"gate_up_proj": 1 if "down_proj" in projs else 0, "down_proj": 0}
        if "gate_proj" in projs:
            rank, hidden = matrices["gate_proj.lora_A"]
            if matrices["up_proj.lora_A"][0] != rank:
                raise CheckpointError(
                    f"{where}: {prefix}: gate_proj has rank {rank}, up_proj {matrices['up_proj.lora_A'][0]}; "
                    "PEFT's gate_up_proj holds one rank for both"
                )
            gate_a = read_planned(ckpt, plan[names["gate_proj", "A"]])
            shared = torch.equal(gate_a, read_planned(ckpt, plan[names["up_proj", "A"]]))
            gate_up_ranks[prefix] = rank if shared else 2 * rank
            inter = matrices["gate_proj.lora_B"][0]
            rows = num_experts * gate_up_ranks[prefix]
            meta[_peft_name(prefix, depth["gate_up_proj"], "A")] = ((rows, hidden), dtype)
            meta[_peft_name(prefix, depth["gate_up_proj"], "B")] = ((2 * inter, rows), dtype)
        if "down_proj" in projs:
            (rank, inter), hidden = matrices["down_proj.lora_A"], matrices["down_proj.lora_B"][0]
            meta[_peft_name(prefix, 0, "A")] = ((num_experts * rank, inter), dtype)
            meta[_peft_name(prefix, 0, "B")] = ((hidden, num_experts * rank), dtype)

        def make(prefix=prefix, names=names, projs=projs, shared=shared) -> dict[str, torch.Tensor]:
            fused = {key: read_planned(ckpt, plan[name]) for key, name in names.items()}
            out: dict[str, torch.Tensor] = {}
            if "down_proj" in projs:
                a, b = _pack(fused["down_proj", "A"], fused["down_proj", "B"])
                out[_peft_name(prefix, 0, "A")], out[_peft_name(prefix, 0, "B")] = a, b
            if "gate_proj" in projs:
                b_gate, b_up = fused["gate_proj", "B"], fused["up_proj", "B"]
                if shared:
                    a, b = fused["gate_proj", "A"], torch.cat([b_gate, b_up], dim=1)
                else:  # rank 2r: [A_gate; A_up] and B = [[B_gate, 0], [0, B_up]] give B_gate A_gate; B_up A_up
                    a = torch.cat([fused["gate_proj", "A"], fused["up_proj", "A"]], dim=1)
                    b = torch.cat(
                        [
                            torch.cat([b_gate, torch.zeros_like(b_up)], dim=2),
                            torch.cat([torch.zeros_like(b_gate), b_up], dim=2),
                        ],
                        dim=1,
                    )
                a, b = _pack(a, b)
                d = 1 if "down_proj" in projs else 0
                out[_peft_name(prefix, d, "A")], out[_peft_name(prefix, d, "B")] = a, b
            return out

        fused_names.update(names.values())
        replaced[min(names.values(), key=list(plan).index)] = meta
        groups.update(dict.fromkeys(meta, make))
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for name, planned in plan.items():
        if name in replaced:
            for peft, (shape, dtype) in replaced[name].items():
                shapes[peft], dtypes[peft] = shape, dtype
        elif (
            name not in fused_names
        ):  # not experts': a whole tensor of ``ckpt``, which the view reads through
            shapes[name], dtypes[name] = planned.shape, planned.dtype
    view = DerivedCheckpoint(ckpt, shapes, dtypes, groups)
    copied = {
        name: Planned(shape, dtypes[name], [Piece(name, 0, math.prod(shape))])
        for name, shape in shapes.items()
    }
    return view, copied, gate_up_ranks


# --- adapter_config.json ----------------------------------------------------------------------------------

_PATTERN_KINDS = {"rank_pattern": "r", "alpha_pattern": "lora_alpha"}
_PROJS = ("gate_proj", "up_proj", "down_proj")


def _set_patterns(config: dict, needed: dict[tuple[str, str], object], where: object) -> None:
    """Make ``config``'s patterns give each ``(pattern kind, module key)`` of ``needed`` its value, as PEFT reads
    them from the written config (keys sorted): keep what already gives it, add a key naming the module where
    nothing does, refuse where another key gives another value."""
    for (kind, key), value in needed.items():
        patterns = dict(sorted((config.get(kind) or {}).items()))
        default = config.get(_PATTERN_KINDS[kind])
        hit = next((p for p in patterns if re.match(rf"(.*\.)?({p})$", key)), None)
        current = patterns[hit] if hit is not None else default
        if current == value:
            continue
        if hit is not None:
            raise CheckpointError(
                f"{where}: {kind} key {hit!r} gives {key} {current}, the converted adapter needs {value}; give "
                "that module a key of its own"
            )
        config[kind] = {**patterns, key: value}


def _without(config: dict, drop: Callable[[str], bool]) -> None:
    for kind in _PATTERN_KINDS:
        if config.get(kind):
            config[kind] = {k: v for k, v in config[kind].items() if not drop(k)}


def config_from_peft(config: dict, blocks: list[ExpertBlock], where: object) -> dict:
    """A ``peft_target_parameters`` adapter's config for its factors in the ``fused`` layout: LoRA on
    ``gate_proj``/``up_proj``/``down_proj`` modules, each at its parameter's rank and alpha."""
    config = dict(config)
    needed: dict[tuple[str, str], object] = {}
    alphas = dict(config.get("alpha_pattern") or {})
    present: set[str] = set()
    for block in blocks:
        key = module_key(block.prefix)
        for proj in _PROJS:
            if f"{proj}.lora_A" not in block.matrices:
                continue
            present.add(proj)
            param = "down_proj" if proj == "down_proj" else "gate_up_proj"
            needed["rank_pattern", f"{key}.{proj}"] = block.matrices[f"{proj}.lora_A"][0]
            needed["alpha_pattern", f"{key}.{proj}"] = pattern_value(
                alphas, f"{key}.{param}", config.get("lora_alpha")
            )
    _without(config, lambda k: "gate_up_proj" in k)  # names no module once gate and up are apart
    _set_patterns(config, needed, where)
    targets = config.get("target_modules")
    if not isinstance(targets, str):
        # Only the projections that have factors: a targeted one without would get fresh LoRA when loaded.
        config["target_modules"] = sorted(set(targets or []) | present)
    config["target_parameters"] = None
    return config


def config_to_peft(
    config: dict, blocks: list[ExpertBlock], gate_up_ranks: dict[str, int], names: list[str], where: object
) -> dict:
    """The config of an adapter written as ``peft_target_parameters`` from ``config`` (its patterns in the
    ``fused`` layout's naming); ``names`` are the written tensors. gate_up_proj written at rank 2r gets alpha
    doubled, so that its scaling ``alpha / r`` is bit for bit the one gate and up had."""
    config = dict(config)
    needed: dict[tuple[str, str], object] = {}
    alphas, default_alpha = dict(config.get("alpha_pattern") or {}), config.get("lora_alpha")
    targets: set[str] = set()
    for block in blocks:
        key = module_key(block.prefix)
        module = f"{block.prefix.rpartition('.')[2]}.experts"
        if "gate_proj.lora_A" in block.matrices:
            alpha, up_alpha = (
                pattern_value(alphas, f"{key}.{p}", default_alpha) for p in ("gate_proj", "up_proj")
            )
            if alpha != up_alpha:
                raise CheckpointError(
                    f"{where}: {key}: gate_proj has lora_alpha {alpha}, up_proj {up_alpha}; PEFT's gate_up_proj "
                    "holds one alpha for both"
                )
            rank = gate_up_ranks[block.prefix]
            if rank != block.matrices["gate_proj.lora_A"][0]:
                if config.get("use_rslora"):
                    raise CheckpointError(
                        f"{where}: {key}: gate and up have different A factors, so gate_up_proj needs rank 2r, "
                        "and with use_rslora its scaling alpha/sqrt(2r) cannot equal alpha/sqrt(r) exactly"
                    )
                alpha = 2 * alpha
            needed["rank_pattern", f"{key}.gate_up_proj"] = rank
            needed["alpha_pattern", f"{key}.gate_up_proj"] = alpha
            targets.add(f"{module}.gate_up_proj")
        if "down_proj.lora_A" in block.matrices:
            needed["rank_pattern", f"{key}.down_proj"] = block.matrices["down_proj.lora_A"][0]
            needed["alpha_pattern", f"{key}.down_proj"] = pattern_value(
                alphas, f"{key}.down_proj", default_alpha
            )
            targets.add(f"{module}.down_proj")
    # Keys naming the fused gate_proj/up_proj modules name nothing in Transformers' model.
    _without(config, lambda k: re.fullmatch(r".*\.experts\.(gate|up)_proj", k) is not None)
    _set_patterns(config, needed, where)
    modules = config.get("target_modules")
    if not isinstance(modules, str):
        # The experts' projections are parameters now; keep a module name only where LoRA on such modules remains.
        # ("experts.gate_proj" names the experts alone.)
        kept = [
            m
            for m in modules or []
            if m.removeprefix("experts.") not in _PROJS
            or (m in _PROJS and any(f".{m}.lora_" in n and ".experts." not in n for n in names))
        ]
        config["target_modules"] = kept
    config["target_parameters"] = sorted(targets)
    return config
