"""Which input sizes an exported graph takes, and how that is told to torch.export.

The networks of `rmi_triton.models` take any ``[N, 3, H, W]`` with
N, H, W >= 1, so batch, height and width are exported as free dimensions.
A network that constrains a size (say, H a multiple of 32) makes torch.export
fail with "suggested fixes"; those are applied once (torch's own
`refine_dynamic_shapes_from_suggested_fixes`), and the resulting rule is
recorded per dimension (`DimRule`), written into the ONNX graph (input
dimension names such as ``height_multiple_of_32`` and the metadata) and used
to refuse a bad size with a message that states the rule.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .errors import ExportError

DIM_NAMES = ("batch", "channels", "height", "width")
DYNAMIC_AXES = (0, 2, 3)  # batch, height, width; channels are fixed by the first convolution


def format_shape(shape: Sequence[int]) -> str:
    """``(1, 3, 256, 256)`` -> ``"1x3x256x256"``."""
    return "x".join(str(int(n)) for n in shape)


@dataclass(frozen=True)
class DimRule:
    """The sizes one input dimension accepts: a fixed value, or a range with a step."""

    name: str
    fixed: Optional[int] = None
    min: int = 1
    max: Optional[int] = None  # None: no upper bound
    multiple_of: int = 1

    def accepts(self, size: int) -> bool:
        if self.fixed is not None:
            return size == self.fixed
        return (size >= self.min and (self.max is None or size <= self.max)
                and size % self.multiple_of == 0)

    def describe(self) -> str:
        if self.fixed is not None:
            return f"{self.name} fixed at {self.fixed}"
        parts = [f"a multiple of {self.multiple_of}"] if self.multiple_of > 1 else ["any size"]
        parts.append(f">= {self.min}" + (f" and <= {self.max}" if self.max is not None else ""))
        return f"{self.name} {' '.join(parts)}"

    @property
    def onnx_name(self) -> str:
        """The symbolic dimension name in the graph; a constraint shows in the name."""
        return self.name if self.multiple_of == 1 else f"{self.name}_multiple_of_{self.multiple_of}"


@dataclass(frozen=True)
class InputSpec:
    """Rules for the four dimensions of the image input ``[N, C, H, W]``."""

    dims: Tuple[DimRule, ...]

    @property
    def dynamic(self) -> bool:
        return any(d.fixed is None for d in self.dims)

    @property
    def constrained(self) -> bool:
        """True when some dynamic dimension does not take every size >= 1."""
        return any(d.fixed is None and (d.min > 1 or d.max is not None or d.multiple_of > 1)
                   for d in self.dims)

    def describe(self) -> str:
        symbols = [str(d.fixed) if d.fixed is not None else d.onnx_name for d in self.dims]
        rules = "; ".join(d.describe() for d in self.dims if d.fixed is None or d.name != "channels")
        kind = "dynamic" if self.dynamic else "static (exported with dynamic=False)"
        return f"[{', '.join(symbols)}], {kind}: {rules}"

    def check(self, shape: Sequence[int]) -> None:
        """Raise `ExportError` stating the rule when ``shape`` is not an accepted input shape."""
        shape = tuple(int(n) for n in shape)
        if len(shape) != len(self.dims):
            raise ExportError(f"input must be [N, C, H, W]; got shape {shape}")
        bad = [d.describe() for d, n in zip(self.dims, shape) if not d.accepts(n)]
        if bad:
            raise ExportError(f"input {format_shape(shape)} is not a size this graph takes ({'; '.join(bad)}); "
                              f"the graph takes {self.describe()}")

    def pick(self, shape: Sequence[int]) -> Tuple[int, ...]:
        """``shape`` where every fixed dimension is replaced by its fixed value."""
        return tuple(d.fixed if d.fixed is not None else int(n) for d, n in zip(self.dims, shape))

    def to_json(self) -> str:
        return json.dumps([dataclasses.asdict(d) for d in self.dims])

    @classmethod
    def from_json(cls, text: str) -> "InputSpec":
        return cls(tuple(DimRule(**d) for d in json.loads(text)))

    @classmethod
    def static(cls, shape: Sequence[int]) -> "InputSpec":
        return cls(tuple(DimRule(name, fixed=int(n)) for name, n in zip(DIM_NAMES, shape)))


def free_dims() -> Dict[int, Any]:
    """Batch, height and width free, each >= 1 (what our networks allow)."""
    Dim = torch.export.Dim
    return {axis: Dim(DIM_NAMES[axis], min=1) for axis in DYNAMIC_AXES}


def _bound(value) -> Optional[int]:
    text = str(value)
    return None if text in ("oo", "int_oo", "inf") else int(text)


def spec_from_program(program: torch.export.ExportedProgram) -> InputSpec:
    """Read the accepted sizes of the (single) image input off an ExportedProgram."""
    user_inputs = set(program.graph_signature.user_inputs)
    image = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs][0]
    rules: List[DimRule] = []
    for name, size in zip(DIM_NAMES, image.meta["val"].shape):
        if not isinstance(size, torch.SymInt):
            rules.append(DimRule(name, fixed=int(size)))
            continue
        expr = size.node.expr
        factor, _ = expr.as_coeff_Mul()  # 32*s0 -> (32, s0); s0 -> (1, s0)
        multiple = int(factor) if factor.is_Integer and int(factor) > 1 else 1
        bounds = program.range_constraints.get(expr)
        if bounds is None:  # a derived size: the range is kept for its base symbol
            (symbol,) = expr.free_symbols
            inner = program.range_constraints[symbol]
            lo, hi = int(expr.subs(symbol, int(inner.lower))), _bound(inner.upper)
            hi = None if hi is None else int(expr.subs(symbol, hi))
        else:
            lo, hi = int(bounds.lower), _bound(bounds.upper)
        rules.append(DimRule(name, min=max(lo, multiple, 1), max=hi, multiple_of=multiple))
    return InputSpec(tuple(rules))
