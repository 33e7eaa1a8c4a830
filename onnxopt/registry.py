"""Pass registry: every onnxopt pass is an onnx_ir pass registered under a CLI name.

Options are the keyword parameters of the pass's ``__init__`` (typed by annotation, documented in the
class docstring's ``Args:`` section), so ``QuantizeInt8Pass(calibration="entropy")`` in Python and
``-p quantize-int8:calibration=entropy`` on the CLI mean the same. Two parameters are injected by the
pipeline rather than given as options: ``data`` (a :class:`onnxopt.calibration.Dataset`) and
``node_filter`` (a :class:`onnxopt.filters.NodeFilter`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
import types
import typing
from typing import Any, Literal

import onnx_ir as ir

from onnxopt.errors import PassOptionError

INJECTED = ("data", "node_filter", "original")


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    type: Any
    default: Any
    doc: str

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


@dataclasses.dataclass(frozen=True)
class PassInfo:
    name: str
    cls: type[ir.passes.PassBase]
    lossless: bool
    summary: str
    options: dict[str, Option]
    uses_data: bool

    def create(self, options: dict[str, Any] | None = None, **injected: Any) -> ir.passes.PassBase:
        """Instantiate the pass; string option values are converted to the option's type."""
        kwargs = {}
        for key, raw in (options or {}).items():
            key = key.replace("-", "_")
            if key not in self.options:
                valid = ", ".join(self.options) or "none"
                raise PassOptionError(f"pass '{self.name}' has no option '{key}' (valid: {valid})")
            kwargs[key] = convert(raw, self.options[key].type, f"{self.name}:{key}")
        params = inspect.signature(self.cls.__init__).parameters
        kwargs.update({k: v for k, v in injected.items() if k in params and v is not None})
        try:
            return self.cls(**kwargs)
        except (ValueError, TypeError) as exc:
            raise PassOptionError(f"pass '{self.name}': {exc}") from None


_REGISTRY: dict[str, PassInfo] = {}
_loaded = False


def register(name: str, *, lossless: bool):
    """Class decorator registering an onnx_ir pass under ``name``."""

    def decorate(cls):
        _REGISTRY[name] = _describe(name, cls, lossless)
        cls.registered_name = name
        return cls

    return decorate


def get(name: str) -> PassInfo:
    _load_all()
    if name not in _REGISTRY:
        raise PassOptionError(f"unknown pass '{name}' (valid: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def all_passes() -> list[PassInfo]:
    _load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _load_all() -> None:
    """Import every module of ``onnxopt.passes`` so their ``@register`` decorators run."""
    global _loaded
    if _loaded:
        return
    package = importlib.import_module("onnxopt.passes")
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"onnxopt.passes.{module.name}")
    _loaded = True


def _describe(name: str, cls: type, lossless: bool) -> PassInfo:
    doc = inspect.getdoc(cls) or ""
    summary = doc.splitlines()[0] if doc else ""
    arg_docs = _arg_docs(doc)
    hints = typing.get_type_hints(cls.__init__)
    options = {}
    params = inspect.signature(cls.__init__).parameters
    for pname, param in params.items():
        if pname == "self" or pname in INJECTED or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        default = None if param.default is inspect.Parameter.empty else param.default
        options[pname] = Option(pname, hints.get(pname, str), default, arg_docs.get(pname, ""))
    return PassInfo(name, cls, lossless, summary, options, "data" in params)


def _arg_docs(doc: str) -> dict[str, str]:
    docs, current, in_args = {}, None, False
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if in_args:
            m = re.match(r"^\s{4}(\w+)(?: \(.*\))?:\s*(.*)$", line)
            if m:
                current = m.group(1)
                docs[current] = m.group(2)
            elif line.startswith("        ") and current:
                docs[current] += " " + line.strip()
            elif line.strip():
                in_args = False
    return docs


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " (optional)"
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def convert(raw: Any, tp: Any, where: str) -> Any:
    """Convert a CLI/recipe value to the annotated type ``tp``; raise PassOptionError if it does not fit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(raw, arg, where)
            except PassOptionError as exc:
                errors.append(str(exc))
        raise PassOptionError(errors[0])
    if origin is Literal:
        for choice in args:
            if str(choice) == str(raw):
                return choice
        raise PassOptionError(f"{where} must be one of {', '.join(map(str, args))}, got '{raw}'")
    if origin in (list, tuple):
        items = raw if isinstance(raw, (list, tuple)) else [s for s in str(raw).split("+") if s]
        converted = [convert(item, args[0], where) for item in items]
        return tuple(converted) if origin is tuple else converted
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if str(raw).lower() in ("0", "false", "no", "off"):
            return False
        raise PassOptionError(f"{where} must be true or false, got '{raw}'")
    if tp in (int, float):
        if isinstance(raw, bool):
            raise PassOptionError(f"{where} must be a number, got '{raw}'")
        try:
            value = tp(raw)
        except (TypeError, ValueError):
            raise PassOptionError(f"{where} must be {'an integer' if tp is int else 'a number'}, got '{raw}'") from None
        return value
    if tp is str:
        return str(raw)
    return raw
