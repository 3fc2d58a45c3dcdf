"""``ExpertWeights4bit``: a frozen ``[E, out, in]`` expert weight stack held in bitsandbytes' 4-bit format.

It is a tensor (a PyTorch wrapper subclass) of the stack's logical shape and compute dtype, so it sits in an
experts module as its ``gate_up_proj`` / ``down_proj`` parameter where Transformers, PEFT and moefuse look for
them: shapes, ``.to(device)``, ``.transpose(1, 2)``, ``state_dict()`` and ``load_state_dict()`` (bnb-style
components, see :meth:`ExpertWeights4bit.components`) work. The moefuse experts ops recognise it and run their
grouped GEMMs on the 4-bit data (Triton: dequantisation inside the GEMM, or into a bf16 copy per call); any other
operation sees the dequantised tensor, which is correct but materialises the stack (e.g. Transformers' own
``grouped_mm`` experts).
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch.utils._pytree import tree_map

from . import formats

aten = torch.ops.aten
# Components in a state dict, after the weight's own key: bitsandbytes' names for a Linear4bit's weight, with one
# row per expert. The packed bytes go under the key itself.
COMPONENTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset")
QUANT_STATE_KEY = (
    "quant_state.moefuse__"  # + quant type: a uint8 tensor holding the JSON of the non-tensor fields
)
_DEFAULT_STEP_ELEMENTS = 1 << 20  # values quantized per step: ~70 MB of temporaries on the GPU


class ExpertWeights4bit(torch.Tensor):
    """A 4-bit ``[E, out, in]`` expert weight stack; per expert exactly bitsandbytes' ``quantize_4bit`` output.

    Create with :meth:`quantize` (or :meth:`from_quant_states` from bitsandbytes' per-expert output, or
    :meth:`from_components` from a state dict). Inner tensors:

    - ``packed`` uint8 ``[E, ceil(out * in / 2)]``: each expert's 4-bit codes, row-major, two per byte;
    - ``absmax`` ``[E, blocks]``: fp32 per-block scales, or uint8 when ``nested`` (then with ``nested_absmax``
      fp32 ``[E, ceil(blocks / 256)]``, ``offset`` fp32 ``[E]`` and ``nested_code`` fp32 ``[256]``);
    - ``code`` fp32 ``[16]``: the values of the 4-bit codes (NF4 or FP4).

    ``transposed`` marks a ``transpose(1, 2)`` view (logical shape ``[E, in, out]``) of the same data.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    nested_absmax: torch.Tensor | None
    offset: torch.Tensor | None
    nested_code: torch.Tensor | None

    @staticmethod
    def __new__(cls, packed, absmax, code, nested, *, shape, quant_type, blocksize, dtype, transposed=False):
        experts, out_features, in_features = shape
        if transposed:
            size, strides = (experts, in_features, out_features), (out_features * in_features, 1, in_features)
        else:
            size, strides = (experts, out_features, in_features), (out_features * in_features, in_features, 1)
        return torch.Tensor._make_wrapper_subclass(
            cls, size, strides=strides, dtype=dtype, device=packed.device, requires_grad=False
        )

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        code: torch.Tensor,
        nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        *,
        shape: tuple[int, int, int],
        quant_type: str,
        blocksize: int,
        dtype: torch.dtype,
        transposed: bool = False,
    ) -> None:
        self.packed, self.absmax, self.code = packed, absmax, code
        self.nested_absmax, self.offset, self.nested_code = (
            nested if nested is not None else (None, None, None)
        )
        self.stored_shape = tuple(int(s) for s in shape)  # [E, out, in] of the data, whatever the view
        self.quant_type, self.blocksize, self.transposed = quant_type, int(blocksize), bool(transposed)

    # ---- creation -------------------------------------------------------------------------------------------

    @classmethod
    def quantize(
        cls,
        weight: torch.Tensor,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        rounding: str | None = None,
    ) -> ExpertWeights4bit:
        """Quantize ``weight [E, out, in]`` expert by expert, a few experts at a time on ``device`` (default:
        ``weight``'s), so a stack held on the CPU never goes to the GPU whole. ``dtype``: the compute dtype
        (default ``weight``'s). ``rounding``: ``"cuda"`` or ``"cpu"`` to round as bitsandbytes does there
        (default: as it would on ``device``)."""
        if weight.dim() != 3:
            raise ValueError(f"expert weights must be [E, out, in], got shape {tuple(weight.shape)}")
        if quant_type not in formats.QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {formats.QUANT_TYPES}, got {quant_type!r}")
        if blocksize not in formats.BLOCKSIZES:
            raise ValueError(
                f"blocksize must be one of {formats.BLOCKSIZES} (bitsandbytes'), got {blocksize}"
            )
        if not weight.dtype.is_floating_point:
            raise TypeError(f"expert weights must be floating point to quantize, got {weight.dtype}")
        device = torch.device(device) if device is not None else weight.device
        experts = weight.shape[0]
        n = weight.shape[1] * weight.shape[2]
        # A step is a few experts, or a piece of one expert cut at a block boundary (blocks are quantized
        # independently, so the pieces give the bytes the whole expert would).
        step = max(1, _DEFAULT_STEP_ELEMENTS // max(1, n))
        piece = n if n <= _DEFAULT_STEP_ELEMENTS else _DEFAULT_STEP_ELEMENTS // blocksize * blocksize
        packed = torch.empty(experts, (n + 1) // 2, dtype=torch.uint8, device=device)
        absmax = torch.empty(experts, math.ceil(n / blocksize), dtype=torch.float32, device=device)
        for start in range(0, experts, step):
            rows = slice(start, start + step)
            flat = weight[rows].detach().reshape(-1, n)  # a view where the stack is contiguous
            for col in range(0, n, piece):
                chunk = flat[:, col : col + piece].to(device)
                packed_cols = slice(col // 2, (col + piece + 1) // 2)
                absmax_cols = slice(col // blocksize, math.ceil((col + piece) / blocksize))
                packed[rows, packed_cols], absmax[rows, absmax_cols] = formats.quantize_rows_4bit(
                    chunk, quant_type, blocksize, rounding
                )
                del chunk
        nested = None
        if compress_statistics:
            # Experts a few at a time too: the nested 8-bit search holds ~64 bytes of temporaries per absmax.
            rows = max(1, _DEFAULT_STEP_ELEMENTS // 4 // absmax.shape[1])
            parts = [
                formats.quantize_absmax_nested(absmax[r : r + rows], rounding)
                for r in range(0, experts, rows)
            ]
            qabsmax, nested_absmax, offset = (torch.cat(p) for p in zip(*parts, strict=True))
            absmax, nested = qabsmax, (nested_absmax, offset, formats.dynamic_code(device))
        return cls(
            packed,
            absmax,
            formats.code_values(quant_type, device),
            nested,
            shape=tuple(weight.shape),
            quant_type=quant_type,
            blocksize=blocksize,
            dtype=dtype or weight.dtype,
        )

    @classmethod
    def from_quant_states(
        cls, packed: list[torch.Tensor], states: list[Any], dtype: torch.dtype | None = None
    ) -> ExpertWeights4bit:
        """Stack bitsandbytes' per-expert ``quantize_4bit`` outputs (packed bytes and ``QuantState``s) into one
        tensor; the experts must share shape, quant type, blocksize and nesting."""
        first = states[0]
        if any(
            (tuple(s.shape), s.quant_type, s.blocksize, s.nested)
            != (tuple(first.shape), first.quant_type, first.blocksize, first.nested)
            for s in states
        ):
            raise ValueError(
                "every expert's QuantState must have the same shape, quant_type, blocksize, nesting"
            )
        if len(first.shape) != 2:
            raise ValueError(f"each expert's QuantState must describe an [out, in] matrix, got {first.shape}")
        nested = None
        if first.nested:
            nested = (
                torch.stack([s.state2.absmax for s in states]),
                torch.stack([s.offset.reshape(()) for s in states]).float(),
                first.state2.code,
            )
        return cls(
            torch.stack([p.reshape(-1).view(torch.uint8) for p in packed]),
            torch.stack([s.absmax for s in states]),
            first.code,
            nested,
            shape=(len(states), *first.shape),
            quant_type=first.quant_type,
            blocksize=first.blocksize,
            dtype=dtype or first.dtype,
        )

    # ---- views of the data ----------------------------------------------------------------------------------

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def _inner(self) -> dict[str, torch.Tensor | None]:
        return {
            "packed": self.packed,
            "absmax": self.absmax,
            "code": self.code,
            "nested_absmax": self.nested_absmax,
            "offset": self.offset,
            "nested_code": self.nested_code,
        }

    @classmethod
    def _from_inner(
        cls, inner: dict, *, shape, quant_type, blocksize, dtype, transposed
    ) -> ExpertWeights4bit:
        """A tensor over the inner tensors named as :meth:`_inner` names them (nested ones absent or ``None``)."""
        nested = None
        if inner.get("nested_absmax") is not None:
            nested = (inner["nested_absmax"], inner["offset"], inner["nested_code"])
        return cls(
            inner["packed"],
            inner["absmax"],
            inner["code"],
            nested,
            shape=shape,
            quant_type=quant_type,
            blocksize=blocksize,
            dtype=dtype,
            transposed=transposed,
        )

    def _rebuild(self, transform=None, *, transposed: bool | None = None, dtype: torch.dtype | None = None):
        """A new tensor over ``transform(inner)`` for each inner tensor (default: the same ones)."""
        inner = {k: (v if transform is None or v is None else transform(v)) for k, v in self._inner().items()}
        return ExpertWeights4bit._from_inner(
            inner,
            shape=self.stored_shape,
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            dtype=dtype or self.dtype,
            transposed=self.transposed if transposed is None else transposed,
        )

    def absmax_fp32(self, experts: slice = slice(None)) -> torch.Tensor:
        """The per-block scales of ``experts`` as fp32 ``[e, blocks]`` (the nested statistics dequantised)."""
        if not self.nested:
            return self.absmax[experts]
        return formats.dequantize_absmax(
            self.absmax[experts], self.nested_absmax[experts], self.offset[experts]
        )

    def dequantize(self, experts: slice = slice(None), dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense stack (in PyTorch; the reference of the kernels) of ``experts``, in this tensor's shape
        (a transposed view if it is one) and ``dtype`` (default: the compute dtype)."""
        _, out_features, in_features = self.stored_shape
        values = formats.dequantize_rows_4bit(
            self.packed[experts],
            self.absmax_fp32(experts),
            self.code,
            out_features * in_features,
            self.blocksize,
        )
        dense = values.to(dtype or self.dtype).view(-1, out_features, in_features)
        return dense.transpose(1, 2) if self.transposed else dense

    def quant_state(self, expert: int):
        """Expert ``expert`` as bitsandbytes sees it: ``(packed [n/2, 1] uint8, QuantState)``, what
        ``bitsandbytes.functional.quantize_4bit`` returns for that expert's matrix."""
        from bitsandbytes.functional import QuantState

        state2 = offset = None
        if self.nested:
            state2 = QuantState(
                absmax=self.nested_absmax[expert],
                code=self.nested_code,
                blocksize=formats.NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
            offset = self.offset[expert]
        state = QuantState(
            absmax=self.absmax[expert],
            shape=torch.Size(self.stored_shape[1:]),
            code=self.code,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=self.dtype,
            offset=offset,
            state2=state2,
        )
        return self.packed[expert].unsqueeze(1), state

    def nbytes_4bit(self) -> int:
        """Bytes held by the 4-bit data and its statistics."""
        return sum(t.numel() * t.element_size() for t in self._inner().values() if t is not None)

    # ---- state dict ------------------------------------------------------------------------------------------

    def components(self, key: str) -> dict[str, torch.Tensor]:
        """This weight as plain tensors for a state dict, named after ``key`` as bitsandbytes names a
        Linear4bit's weight: ``key`` (packed bytes), ``key.absmax``, ``key.quant_map``, with nested statistics
        ``key.nested_absmax``, ``key.nested_quant_map``, ``key.nested_offset``, and
        ``key.quant_state.moefuse__<quant_type>`` (the other fields as JSON bytes). Always the stored
        orientation: a transposed view saves its data."""
        fields = {
            "shape": list(self.stored_shape),
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        out = {key: self.packed, f"{key}.absmax": self.absmax, f"{key}.quant_map": self.code}
        if self.nested:
            fields["nested_blocksize"] = formats.NESTED_BLOCKSIZE
            out.update(
                {
                    f"{key}.nested_absmax": self.nested_absmax,
                    f"{key}.nested_quant_map": self.nested_code,
                    f"{key}.nested_offset": self.offset,
                }
            )
        data = json.dumps(fields, sort_keys=True).encode()
        out[f"{key}.{QUANT_STATE_KEY}{self.quant_type}"] = torch.frombuffer(
            bytearray(data), dtype=torch.uint8
        )
        return out

    @staticmethod
    def is_component(key: str, weight_key: str) -> bool:
        """Whether state-dict ``key`` is one of :meth:`components`' keys for ``weight_key``."""
        if key == weight_key:
            return True
        suffix = key.removeprefix(weight_key + ".")
        return suffix != key and (suffix in COMPONENTS or suffix.startswith(QUANT_STATE_KEY))

    @classmethod
    def from_components(cls, tensors: dict[str, torch.Tensor], key: str) -> ExpertWeights4bit:
        """Rebuild from :meth:`components`' tensors (``tensors`` may hold other keys too)."""
        state_keys = [k for k in tensors if k.startswith(f"{key}.{QUANT_STATE_KEY}")]
        if len(state_keys) != 1 or key not in tensors:
            raise KeyError(
                f"{key}: no 4-bit expert weight here (expected '{key}' and one '{key}.{QUANT_STATE_KEY}<type>' "
                "entry, as moefuse.quant writes them)"
            )
        fields = json.loads(bytes(tensors[state_keys[0]].cpu().tolist()).decode())
        nested = None
        if "nested_blocksize" in fields:
            if fields["nested_blocksize"] != formats.NESTED_BLOCKSIZE:
                raise ValueError(
                    f"{key}: nested blocksize {fields['nested_blocksize']} is not bitsandbytes' 256"
                )
            nested = tuple(
                tensors[f"{key}.{name}"] for name in ("nested_absmax", "nested_offset", "nested_quant_map")
            )
        return cls(
            tensors[key],
            tensors[f"{key}.absmax"],
            tensors[f"{key}.quant_map"],
            nested,
            shape=tuple(fields["shape"]),
            quant_type=fields["quant_type"],
            blocksize=fields["blocksize"],
            dtype=getattr(torch, fields["dtype"]),
        )

    # ---- tensor protocol -------------------------------------------------------------------------------------

    def __repr__(self) -> str:
        nested = ", nested" if self.nested else ""
        view = ", transposed view" if self.transposed else ""
        return (
            f"ExpertWeights4bit(shape={tuple(self.shape)}, {self.quant_type}, blocksize={self.blocksize}{nested}, "
            f"dtype={self.dtype}, device={self.device}{view})"
        )

    def __tensor_flatten__(self):
        names = [k for k, v in self._inner().items() if v is not None]
        meta = (self.stored_shape, self.quant_type, self.blocksize, self.dtype, self.transposed)
        return names, meta

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        shape, quant_type, blocksize, dtype, transposed = meta
        return ExpertWeights4bit._from_inner(
            inner, shape=shape, quant_type=quant_type, blocksize=blocksize, dtype=dtype, transposed=transposed
        )

    def to(self, *args: Any, **kwargs: Any) -> ExpertWeights4bit:
        """Move the 4-bit data to a device; a floating dtype changes the compute dtype (the data stays 4-bit).
        Always a new tensor (``Module.to`` swaps it in even when nothing moves)."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"4-bit expert weights compute in a floating dtype, not {dtype}")
        if device is None:
            return self._rebuild(dtype=dtype)
        return self._rebuild(lambda t: t.to(device, non_blocking=non_blocking), dtype=dtype)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if _writes_into_4bit(func, args, kwargs):
            raise NotImplementedError(
                f"{func} would write into 4-bit expert weights, which are frozen; copy_ a dense tensor in to "
                "requantize, or train LoRA adapters on top"
            )
        return func(*tree_map(_dense, args), **tree_map(_dense, kwargs))


def _dense(value: Any) -> Any:
    return value.dequantize() if isinstance(value, ExpertWeights4bit) else value


def _writes_into_4bit(func, args, kwargs) -> bool:
    schema = func._schema
    for i, argument in enumerate(schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(argument.name)
        if isinstance(value, ExpertWeights4bit):
            return True
    return False


def _shallow(t: ExpertWeights4bit, *args: Any, **kwargs: Any) -> ExpertWeights4bit:
    return t._rebuild()


def _transpose(t: ExpertWeights4bit, dim0: int, dim1: int) -> ExpertWeights4bit | torch.Tensor:
    if sorted((dim0 % 3, dim1 % 3)) == [1, 2]:
        return t._rebuild(transposed=not t.transposed)
    if dim0 % 3 == dim1 % 3:
        return t._rebuild()
    return t.dequantize().transpose(dim0, dim1)


def _to_copy(
    t: ExpertWeights4bit, *, dtype=None, device=None, non_blocking=False, **_: Any
) -> ExpertWeights4bit:
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"4-bit expert weights compute in a floating dtype, not {dtype}")
    return t._rebuild(
        lambda x: x.to(device=device, non_blocking=non_blocking) if device is not None else x.clone(),
        dtype=dtype,
    )


def _clone(t: ExpertWeights4bit, **_: Any) -> ExpertWeights4bit:
    return t._rebuild(lambda x: x.clone())


def _copy_(dst: ExpertWeights4bit, src: torch.Tensor, non_blocking: bool = False) -> ExpertWeights4bit:
    """Into 4-bit weights: another 4-bit tensor's data, or a dense tensor requantized in ``dst``'s format (as
    bitsandbytes does when PEFT merges into a Linear4bit)."""
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(
            f"cannot copy a {tuple(src.shape)} tensor into 4-bit weights of shape {tuple(dst.shape)}"
        )
    if not isinstance(src, ExpertWeights4bit) or src.transposed != dst.transposed:
        dense = src.dequantize() if isinstance(src, ExpertWeights4bit) else src
        stored = dense.transpose(1, 2) if dst.transposed else dense
        src = ExpertWeights4bit.quantize(
            stored, dst.quant_type, dst.blocksize, dst.nested, device=dst.device, dtype=dst.dtype
        )
    elif (src.quant_type, src.blocksize, src.nested) != (dst.quant_type, dst.blocksize, dst.nested):
        raise ValueError(
            f"cannot copy {src.quant_type}/{src.blocksize}/nested={src.nested} 4-bit weights into "
            f"{dst.quant_type}/{dst.blocksize}/nested={dst.nested} ones; dequantize() first"
        )
    for name, target in dst._inner().items():
        if target is not None:
            target.copy_(getattr(src, name), non_blocking=non_blocking)
    return dst


def _select(t: ExpertWeights4bit, dim: int, index: int) -> torch.Tensor:
    if dim % 3 != 0:
        return t.dequantize().select(dim, index)
    index = index % t.shape[0]
    return t.dequantize(slice(index, index + 1))[0]


_HANDLERS = {
    aten.detach.default: _shallow,
    aten.alias.default: _shallow,
    aten.transpose.int: _transpose,
    aten._to_copy.default: _to_copy,
    aten.clone.default: _clone,
    aten.copy_.default: _copy_,
    aten.select.int: _select,
}


def is_4bit(weight: Any) -> bool:
    """Whether ``weight`` is a 4-bit expert weight stack."""
    return isinstance(weight, ExpertWeights4bit)
