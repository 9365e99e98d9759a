"""Typed, validated, frozen configuration sections built from plain dicts (YAML).

Every section is a frozen dataclass whose fields are declared with :func:`param`, which carries the
documentation and the allowed range. :func:`build` turns a nested dict into the dataclass tree and
raises :class:`ConfigError` with one line naming the source file, the dotted key, what was expected
and what was got. Nothing here evaluates strings: values are checked, never executed.

Example::

    @dataclass(frozen=True)
    class MotorConfig:
        max_force_n: float = param(10.0, "peak actuator force", gt=0)
        mode: str = param("torque", "control mode", choices=("torque", "velocity"))

    cfg = build(MotorConfig, {"max_force_n": 12}, source="rig.yaml", prefix="motor")
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range.

    ``str(err)`` is one line: ``<source>: <key>: expected <expected>, got <got>``.
    """

    def __init__(self, source: str, key: str, expected: str, got: Any):
        self.source, self.key, self.expected, self.got = source, key, expected, got
        super().__init__(f"{source}: {key}: expected {expected}, got {got!r}")


def require_names(key: str, names: Any, allowed: Any) -> None:
    """Raise a one-line :class:`ConfigError` naming ``key`` if any of ``names`` is not in ``allowed``
    (channel names in a config list, say)."""
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise ConfigError("config", key, f"names from {list(allowed)}", unknown)


def param(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    factory: Any = None,
) -> Any:
    """Declare a config field with its documentation and constraints (checked by :func:`build`)."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults must be given as factory=")
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return {"float": "a number", "int": "an integer", "bool": "true/false", "str": "a string"}.get(
            tp.__name__, tp.__name__
        )
    return str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as err:
                errors.append(err.expected)
        raise ConfigError(
            source, key, " or ".join(errors) + (" or null" if type(None) in args else ""), value
        )
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(source, key, "one of " + ", ".join(map(repr, get_args(tp))), value)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, key, f"a list ({_type_name(tp)})", value)
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(source, key, f"a list of {len(args)} items", value)
            return tuple(
                _coerce(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        item = args[0] if args else Any
        return tuple(_coerce(item, v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, key, "a mapping", value)
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(kt, k, source, key): _coerce(vt, v, source, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, source=source, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, "true/false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e8" (no dot) as a string; it is a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, "a number", value)
        if value != value or value in (float("inf"), float("-inf")):  # a NaN or infinite setting is a
            raise ConfigError(source, key, "a finite number", value)  # typo or a switched-off check
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, "a string", value)
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def check_range(field: dataclasses.Field, value: Any, source: str, key: str) -> None:
    """Raise ConfigError if ``value`` breaks the choices or bounds declared with :func:`param`."""
    meta = field.metadata
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(source, key, "one of " + ", ".join(map(str, choices)), value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for bound, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        b = meta.get(bound)
        if b is not None and not ok(value, b):
            raise ConfigError(source, key, f"a value {word} {b}", value)


def build(cls: type[T], data: Any, *, source: str = "<config>", prefix: str = "") -> T:
    """Build the frozen dataclass ``cls`` from a nested mapping, validating every key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, prefix or "<root>", f"a mapping for section {cls.__name__}", data)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            key = f"{prefix}.{k}" if prefix else str(k)
            near = [n for n in fields if _similar(str(k), n)]
            hint = f"one of the known keys ({', '.join(sorted(fields))})"
            if near:
                hint = f"a known key (did you mean '{near[0]}'?)"
            raise ConfigError(source, key, hint, "unknown key")
    kwargs = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = _coerce(hints[name], data[name], source, key)
            check_range(field, value, source, key)
            kwargs[name] = value
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(source, key, f"a value ({_type_name(hints[name])})", "missing")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError as err:  # a check that names its key: it gets the file it came from
            if err.source == "config":
                raise ConfigError(source, err.key, err.expected, err.got) from None
            raise
        except ValueError as err:  # section-level cross-field checks: show the values they name
            named = [
                f"{f.name}={getattr(obj, f.name)!r}"
                for f in dataclasses.fields(obj)
                if re.search(rf"\b{f.name}\b", str(err))
            ]
            raise ConfigError(
                source, prefix or "<root>", str(err), ", ".join(named) or "inconsistent values"
            ) from None
    return obj


def _similar(a: str, b: str) -> bool:
    """Cheap typo detector: same letters give or take one edit."""
    if abs(len(a) - len(b)) > 2:
        return False
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1] <= 2


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config tree (tuples become lists) for YAML/JSON output."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def describe(cls: type) -> list[tuple[str, str, Any]]:
    """(dotted key, doc, default) for every field, for documentation and `--help`."""
    out: list[tuple[str, str, Any]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += [(f"{f.name}.{k}", d, v) for k, d, v in describe(tp)]
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append((f.name, f.metadata.get("doc", ""), default))
    return out
