"""Closed sets of strings, typed in the schema so a typo fails at compose time
with the allowed values listed (Hydra: ``Invalid value 'x', expected one of
[...]``, with the key).

A member is its own string: it compares, hashes, formats and JSON-encodes as
the value, so code and the libraries the value is handed to see a plain str.
"""

from __future__ import annotations

from enum import Enum
from typing import Iterable


class Choice(str, Enum):
    def __str__(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return repr(self.value)


def choices(name: str, values: Iterable[str], module: str) -> type:
    """A Choice whose members are ``values`` (a member may be a Python keyword:
    ``raise``). ``module``: the defining module's ``__name__``, so configs pickle."""
    return Choice(name, [(v, v) for v in values], module=module, qualname=name)
