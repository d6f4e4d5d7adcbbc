"""Nested dataclasses from YAML-style mappings, every value checked; dotted overrides.

Generic: the trainer's config tree (luffy_fast.train_config) is built with it. Errors raise
ConfigError naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import yaml

from luffy_fast.errors import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error: PyYAML
    keeps the last one silently (a second `train:` section replaced the whole first one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` overrides by design
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice in one mapping",
                        key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """A YAML file's contents (None when empty); a ConfigError naming the file when it is
    missing, a folder, not UTF-8 text or not valid YAML (a key given twice included)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (byte {error.start})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {error}") from None


def to_plain(value: Any) -> Any:
    """Dataclasses as nested dicts, tuples as lists: what YAML and JSON hold."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return list(value)
    return value


def convert(key: str, annotation: Any, value: Any) -> Any:
    """Check `value` against a type annotation, converting only where it is lossless."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(key, option, value)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is tuple:
        items = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(f"{key}: expected a list of {len(items)} values (got {value!r})")
        return tuple(convert(f"{key}[{i}]", t, v) for i, (t, v) in enumerate(zip(items, value)))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false (got {value!r})")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer (got {value!r})")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number (got {value!r})")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string (got {value!r})")
        return value
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(key, annotation, value)
    raise ConfigError(f"{key}: unsupported type {annotation!r}")


def build_dataclass(prefix: str, cls: type, values: Any, kwargs_only: bool = False) -> Any:
    """`cls` built from a mapping, every value checked against its annotation (nested
    dataclasses from nested mappings); with kwargs_only, the checked keyword arguments."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys (got {values!r})")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        if name not in known:
            where = f"{prefix}.{name}" if prefix else str(name)
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}: unknown key ({hint}known keys: {', '.join(sorted(known))})")
    kwargs = {name: convert(f"{prefix}.{name}" if prefix else name, hints[name], value)
              for name, value in values.items()}
    return kwargs if kwargs_only else cls(**kwargs)


def apply_overrides(values: dict, overrides: Sequence[str]) -> dict:
    """Apply "dotted.key=value" overrides (values parsed as YAML) to nested mappings."""
    values = _deep_copy(values)
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected dotted.key=value")
        parts = key.split(".")
        node = values
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:  # absent, or a YAML section left empty (`optim:`): its defaults
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[:depth + 1])}: is a value, not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"{key}: cannot parse {text!r}: {error}") from None
    return values


def changed_settings(before: dict, after: dict, prefix: str = "") -> list[str]:
    """"dotted.key: old -> new" for every leaf of two nested config dicts that differs."""
    changes = []
    for key in sorted(set(before) | set(after), key=str):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += changed_settings(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changes


def _deep_copy(values: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in values.items()}


# Value checks shared by the config sections (each raises ConfigError naming owner.name).

def check_int(owner: str, name: str, value: Any, minimum: int = 1,
              maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{owner}.{name}: must be an integer >= {minimum} (got {value!r})")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{owner}.{name}: must be at most {maximum} (got {value!r})")


def check_finite(owner: str, name: str, value: Any, low: float | None = None,
                 high: float | None = None, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = f"{'>' if low_open else '>='} {low}" if low is not None else "finite"
        if high is not None:
            bounds += f" and <= {high}"
        raise ConfigError(f"{owner}.{name}: must be a number {bounds} (got {value!r})")


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{owner}.{name}: must be one of {list(choices)} (got {value!r})")


def check_exists(owner: str, name: str, value: Any, hint: str = "") -> None:
    """A path that names a file or folder: an empty one (the working folder) is refused too."""
    if not (str(value).strip() and Path(value).exists()):
        raise ConfigError(f"{owner}.{name}: no such file or folder {value!r}{hint}")
