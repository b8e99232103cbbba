"""Numeric knobs with their allowed range, declared on the schema field:

    micro_batch_size: int = bounded(4, lo=1)
    dropout: float = bounded(0.0, lo=0, hi=1, hi_open=True)   # [0, 1)

``bound_problems`` walks a composed config and reports every value outside its
field's range (``check_config``), so a zero, a negative or an impossible value
stops the run before any model loads, naming the key. Rules between several
knobs stay in ``checks.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional


@dataclass(frozen=True)
class Bounds:
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def problem(self, key: str, value) -> Optional[str]:
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        low_ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        high_ok = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        if low_ok and high_ok:
            return None
        return f"{key}={value} must be {self.describe()}"

    def describe(self) -> str:
        lo = None if self.lo is None else _num(self.lo)
        hi = None if self.hi is None else _num(self.hi)
        if lo is not None and hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        return f"{'<' if self.hi_open else '<='} {hi}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def bounded(default, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False):
    """A dataclass field with ``default`` and an allowed range (None: open on that side)."""
    return dataclasses.field(default=default, metadata={"bounds": Bounds(lo, hi, lo_open, hi_open)})


def bound_problems(node, path: str = "") -> List[str]:
    """Every value of a composed config outside its declared range."""
    from omegaconf import DictConfig, OmegaConf

    out: List[str] = []
    if not isinstance(node, DictConfig):
        return out
    schema = OmegaConf.get_type(node)
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    for key in node.keys():
        full = f"{path}.{key}" if path else str(key)
        if OmegaConf.is_missing(node, key):
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            out += bound_problems(child, full)
            continue
        spec = fields.get(key)
        bounds = spec.metadata.get("bounds") if spec is not None else None
        if bounds is not None:
            problem = bounds.problem(full, node[key])
            if problem:
                out.append(problem)
    return out
