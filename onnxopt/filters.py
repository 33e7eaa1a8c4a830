"""Node filters given per pass in a recipe: which nodes a pass may touch."""

from __future__ import annotations

import dataclasses
import re

import onnx_ir as ir


@dataclasses.dataclass(frozen=True)
class NodeFilter:
    """Select nodes by op type, name regex and an exclude list; an empty filter selects all.

    Args:
        op_types: Only nodes of these op types (empty: any op type).
        name_regex: Only nodes whose name matches this regular expression (``re.search``).
        exclude: Node names (exact) or regular expressions (full match) never touched.
    """

    op_types: tuple[str, ...] = ()
    name_regex: str | None = None
    exclude: tuple[str, ...] = ()

    def __call__(self, node: ir.Node) -> bool:
        if self.op_types and node.op_type not in self.op_types:
            return False
        name = node.name or ""
        if self.name_regex is not None and not re.search(self.name_regex, name):
            return False
        return not any(name == pattern or re.fullmatch(pattern, name) for pattern in self.exclude)

    @classmethod
    def from_mapping(cls, spec: dict) -> NodeFilter:
        def as_tuple(value) -> tuple[str, ...]:
            if value is None:
                return ()
            return (value,) if isinstance(value, str) else tuple(str(v) for v in value)

        regex = spec.get("name_regex")
        if regex is not None:
            re.compile(regex)
        return cls(as_tuple(spec.get("op_types")), regex, as_tuple(spec.get("exclude")))


SELECT_ALL = NodeFilter()
