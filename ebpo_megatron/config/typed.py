"""Typed configuration: nested dataclasses built from plain dicts (YAML), validated up front.

An unknown key is an error that suggests the key most likely meant, searched in every section
(:func:`suggest_keys`: a well-known name from another framework listed in the root class's
``KEY_ALIASES``, the same name in another section, else the closest name); a value of the wrong
type names the dotted key, the value and the expected type; ``Literal`` choices list the allowed
values; a key that has moved (the root class's ``MOVED_KEYS``, old dotted key -> new) names its
new place. Dotted overrides (``optim.lr=1e-5``) are parsed as YAML scalars and applied before
validation, so a typo on the command line fails at start-up, not at step 300.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-6`` as a float (YAML 1.1 wants ``1.0e-6``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text with :class:`_Loader`."""
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted key."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, root: type) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key, root)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: got {value!r}, expected {' or '.join(_type_name(o) for o in options)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: got {value!r}, expected one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}, expected a list")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]", root) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping")
        _, value_tp = get_args(tp) or (Any, Any)
        return {k: _coerce(v, value_tp, f"{key}.{k}", root) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key, root=root)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r}, expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: got {value!r}, expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {value!r}, expected a string")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass a field of type ``tp`` holds (``X`` or ``X | None``), else None."""
    options = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    return next((o for o in options if dataclasses.is_dataclass(o)), None)


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of dataclass ``cls``, sections and their keys, dotted (``train.optim.lr``)."""
    keys = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        dotted = f"{prefix}{f.name}"
        keys.append(dotted)
        section = _dataclass_in(hints[f.name])
        if section is not None:
            keys += dotted_keys(section, dotted + ".")
    return keys


def suggest_keys(key: str, prefix: str, section_keys: typing.Iterable[str], root: type) -> list[str]:
    """The dotted keys an unknown ``key`` of section ``prefix`` most likely meant: its entry in
    ``root.KEY_ALIASES`` (names other frameworks use for ours), else every key of that name in
    another section, else the closest name (in this section, or a closer one elsewhere:
    similarity >= 0.5 here, >= 0.75 elsewhere)."""
    aliases: dict[str, str] = getattr(root, "KEY_ALIASES", {})
    if key in aliases:  # the aliased key's name in this section (sft.learning_rate -> sft.lr), else the alias
        ours = aliases[key].rsplit(".", 1)[-1]
        return [f"{prefix}.{ours}" if prefix and ours in section_keys else aliases[key]]
    everywhere = dotted_keys(root)
    same_name = [d for d in everywhere if d.rsplit(".", 1)[-1] == key]
    if same_name:
        return same_name
    here = [f"{prefix}.{k}" if prefix else k for k in section_keys]
    scored = [(difflib.SequenceMatcher(None, key, d.rsplit(".", 1)[-1]).ratio(), d)
              for d in dict.fromkeys(here + everywhere)]
    close = [(score, d in here, d) for score, d in scored if score >= (0.5 if d in here else 0.75)]
    return [max(close)[2]] if close else []  # a tie goes to this section


def from_dict(cls: type[T], data: Any, prefix: str = "", root: type | None = None) -> T:
    """Build dataclass ``cls`` from a mapping, recursively, validating keys and types.

    Runs the dataclass's own ``__post_init__`` checks, which raise ConfigError for values that
    are well-typed but wrong (a negative learning rate, an impossible layout). ``root``: the
    outermost config class (default ``cls``), whose keys an unknown key is compared with.
    """
    root = root or cls
    where = prefix or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            moved: str | None = getattr(root, "MOVED_KEYS", {}).get(dotted)
            if moved is not None:
                raise ConfigError(f"{dotted}: moved to {moved}")
            meant = suggest_keys(str(key), prefix, known, root)
            hint = f" Did you mean {' or '.join(repr(m) for m in meant)}?" if meant else ""
            raise ConfigError(f"{dotted}: unknown key.{hint} Valid keys: {sorted(known)}")
        kwargs[key] = _coerce(value, hints[key], dotted, root)
    missing = [
        name for name, f in known.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from err


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (for saving the resolved config as YAML)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as a YAML scalar) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        dotted, raw = item.split("=", 1)
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = load_yaml(raw)
    return data
