"""Typed configuration: YAML recipes -> dataclasses, with overrides and strict checks.

A recipe is a tree of dataclasses. :func:`load_config` reads a YAML file with
``yaml.safe_load``, applies ``key.sub=value`` overrides from the command line, and
builds the dataclass tree, rejecting unknown keys (with a "did you mean" hint) and
values of the wrong type (naming the key's full path). :func:`save_config` writes the
fully resolved tree so a run can be repeated exactly. A renamed key or value keeps its old
spelling as an alias (:func:`rewrite_old_spellings`): it loads, with a deprecation note
in the log, and builds exactly what the new spelling builds.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from facekd.errors import ConfigError
from facekd.fileio import write_text_atomic

T = TypeVar("T")
log = logging.getLogger(__name__)


def _hint(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{path}: {value!r} is not {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}"
                              f"{_hint(str(value), map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, "
                              f"got {type(value).__name__} {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        out = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (origin or tp) is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, val_tp, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")  # schema bug, not user input


def _yaml_word(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def _same_value(a: Any, b: Any) -> bool:
    # type-strict: an old ``true`` must not also match 1 (True == 1 in Python)
    return type(a) is type(b) and a == b


def rewrite_old_spellings(cls: type, data: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """``data`` with the old spellings that dataclass ``cls`` still accepts made current.

    ``cls.old_keys`` maps a renamed key to its new name, ``cls.old_values`` a key to
    {old value: new value}. Each rewrite logs a deprecation note naming the full key, so
    recipes (and the resolved recipes of earlier runs) written before a rename keep loading
    to the same config; giving a key under both its spellings is a ConfigError.
    """
    old_keys: Mapping[str, str] = getattr(cls, "old_keys", {})
    old_values: Mapping[str, Mapping[Any, Any]] = getattr(cls, "old_values", {})
    out = {str(k): v for k, v in data.items()}
    for old, new in old_keys.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"'{_join(path, old)}' is the old spelling of "
                              f"'{_join(path, new)}'; give only '{_join(path, new)}'")
        log.warning("%s is deprecated: it is now spelt %s (same meaning)",
                    _join(path, old), _join(path, new))
        out = {new if k == old else k: v for k, v in out.items()}
    for key, renames in old_values.items():
        if key not in out:
            continue
        for old, new in renames.items():
            if _same_value(out[key], old):
                log.warning("%s: %s is deprecated: it is now spelt %s (same meaning)",
                            _join(path, key), _yaml_word(old), _yaml_word(new))
                out[key] = new
                break
    return out


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, strictly: unknown keys and bad types raise."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    data = rewrite_old_spellings(cls, data, path)
    for key, value in data.items():
        key = str(key)
        if key not in fields:
            where = f" in '{path}'" if path else ""
            raise ConfigError(f"unknown key '{_join(path, key)}'{where}{_hint(key, fields)}")
        kwargs[key] = _convert(value, hints[key], _join(path, key))
    missing = [name for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key '{_join(path, missing[0])}'")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(path)
    return obj


def to_dict(obj: Any) -> Any:
    """The plain (YAML-serialisable) form of a config tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.sub=value`` override set."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{'.'.join(keys[: i + 1])}' "
                                  f"is a value, not a section")
            node = child
        node[keys[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """``yaml.safe_load`` a mapping from ``path`` with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such recipe file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: Iterable[str] = ()) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus overrides."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        if path is None:
            raise
        raise ConfigError(f"{path}: {exc}") from None


def dump_config(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)


def save_config(obj: Any, path: str | Path) -> None:
    """Write the resolved config atomically; :func:`load_config` reads it back equal."""
    write_text_atomic(path, dump_config(obj))
