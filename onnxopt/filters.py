"""Node filters given per pass in a recipe: which nodes a pass may touch."""

from __future__ import annotations

import dataclasses
import re

import onnx_ir as ir

from onnxopt.errors import PassOptionError


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
        """From a recipe entry; PassOptionError naming the key for a value of the wrong kind or a bad pattern."""
        def strings(key: str) -> tuple[str, ...]:
            value = spec.get(key)
            if value is None:
                return ()
            if isinstance(value, str):
                return (value,)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise PassOptionError(f"'{key}' must be a string or a list of strings, got {value!r}")
            return tuple(value)

        regex = spec.get("name_regex")
        if regex is not None and not isinstance(regex, str):
            raise PassOptionError(f"'name_regex' must be a string, got {regex!r}")
        for key, pattern in [("name_regex", regex), *(("exclude", p) for p in strings("exclude"))]:
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise PassOptionError(f"'{key}' pattern '{pattern}' is not a regular expression: {exc}") from None
        return cls(strings("op_types"), regex, strings("exclude"))


SELECT_ALL = NodeFilter()
