"""Typed job configuration: frozen dataclasses filled from YAML plus ``--set key=value`` overrides.

Each component (data, model, eval, ...) is one ``@dataclass(kw_only=True, frozen=True)``; a job config
composes them as fields. A run's config is layered as field defaults <- YAML file <- ``--set`` overrides
and is validated completely (unknown keys, types, ranges) before any work starts, so a typo in a long
distributed job fails in the first second with a message naming the dotted key, not hours in on a worker.

Range checks belong in each component's ``__post_init__`` (raise ``ValueError`` naming the field); this
module re-raises them with the component's dotted path. A partial mapping for a field whose default is a
dataclass instance is laid over that default, so ``--set eval.batch_size=512`` keeps the other eval values.

Values are YAML 1.1 (PyYAML) in files and ``--set`` alike: unquoted ``yes``/``no``/``on``/``off`` are
booleans and ``2024-01-01`` is a date; quote them to get strings. Conversion is strict (no ``"3"`` -> 3,
no ``1.5`` -> int, no ``1`` -> bool) because silent coercion hides exactly the typos this module is for.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import types
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from bikd.storage import read_url

__all__ = ["add_config_args", "apply_overrides", "config_from_args", "dump_yaml", "from_dict", "load_config", "to_dict"]

T = TypeVar("T")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _where(path: str) -> str:
    return f"'{path}'" if path else "the top level"


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:77] + '...' if len(text) > 80 else text} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else repr(tp).replace("typing.", "")


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _mismatch(tp: Any, value: Any, path: str, hint: str = "") -> ValueError:
    return ValueError(f"config {_where(path)}: expected {_type_name(tp)}, got {_show(value)}{hint}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Checks (and, for containers, rebuilds) one value against its annotation; ``path`` is for messages."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # plain Optional: keep the specific message (e.g. from inside a nested component)
            return _convert(options[0], value, path)
        for option in options:
            try:
                return _convert(option, value, path)
            except ValueError:
                pass
        raise _mismatch(tp, value, path)
    if origin is Literal:
        for choice in args:  # compare types too: 1 == True, but a Literal[1] must not accept true
            if value == choice and type(value) is type(choice):
                return choice
        hint = _suggest(value, [c for c in args if isinstance(c, str)]) if isinstance(value, str) else ""
        choices = ", ".join(map(repr, args))
        raise ValueError(f"config {_where(path)}: expected one of {choices}, got {_show(value)}{hint}")
    if tp is bool:
        if type(value) is bool:
            return value
        raise _mismatch(tp, value, path)
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float) if tp is float else int):
            raise _mismatch(tp, value, path)
        return tp(value)
    if tp is str:
        if isinstance(value, str):
            return value
        hint = "" if isinstance(value, (list, Mapping)) else "; quote it to pass a string"
        raise _mismatch(tp, value, path, hint)
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _mismatch(tp, value, path)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _mismatch(tp, value, path, f"; it needs exactly {len(args)} items")
            items = [_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            items = [_convert(args[0] if args else Any, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if tuple in (tp, origin) else items
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise _mismatch(tp, value, path)
        key_tp, value_tp = args or (Any, Any)
        return {_convert(key_tp, k, f"{path} key {k!r}"): _convert(value_tp, v, _join(path, str(k))) for k, v in value.items()}
    if _is_dataclass_type(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, path)
    raise TypeError(f"config {_where(path)}: unsupported field type {_type_name(tp)}")  # a schema bug, not bad input


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        old = merged.get(key)
        merged[key] = _deep_merge(old, value) if isinstance(old, Mapping) and isinstance(value, Mapping) else value
    return merged


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Builds ``cls`` from plain data, rejecting anything the schema does not describe.

    ``path`` is the dotted location of ``data`` inside the whole job config, so errors from nested
    components point at ``eval.batch_size`` rather than a bare ``batch_size``.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"{cls!r} is not a dataclass type")
    if not isinstance(data, Mapping):
        raise ValueError(f"config {_where(path)}: expected a mapping for {cls.__name__}, got {_show(data)}")
    hints = get_type_hints(cls)  # resolves string annotations from `from __future__ import annotations`
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [str(k) for k in data if k not in fields]
    if unknown:
        problems = "; ".join(f"unknown config key {k!r} at '{_join(path, k)}'{_suggest(k, fields)}" for k in unknown)
        raise ValueError(f"{problems}; valid keys for {cls.__name__} at {_where(path)}: {', '.join(fields)}")
    missing = [_join(path, n) for n, f in fields.items() if n not in data and _default(f) is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing required config key(s) for {cls.__name__} at {_where(path)}: {', '.join(missing)}")
    kwargs = {}
    for name, value in data.items():
        default = _default(fields[name]) if isinstance(value, Mapping) else None
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            value = _deep_merge(to_dict(default), value)
        kwargs[name] = _convert(hints[name], value, _join(path, name))
    try:
        return cls(**kwargs)
    except ValueError as e:  # a __post_init__ range check: add where in the job config it happened
        raise ValueError(f"invalid {cls.__name__} at {_where(path)}: {e}") from e


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML-safe data (tuples become lists) that ``from_dict`` turns back into an equal config."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a dataclass instance, got {_show(cfg)}")
    return _plain(cfg)


def dump_yaml(cfg: Any) -> str:
    """The config as YAML in field order, e.g. to store next to a run's outputs for reproduction."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns a copy of ``data`` with each ``a.b.c=value`` applied in order (later ones win).

    Values are parsed as YAML so ``3``, ``0.1``, ``true``, ``[1, 2]`` and ``null`` get their types. Keys
    are not checked here: ``from_dict`` rejects unknown ones with their full dotted path and a suggestion.
    """
    result = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = [p.strip() for p in key.split(".")]
        if not sep or not all(parts):
            raise ValueError(f"malformed override {item!r}: expected KEY=VALUE, KEY dotted (e.g. eval.batch_size=512)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: value is not valid YAML: {e}") from e
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:  # absent, or an Optional component set to null: start it from its defaults
                child = node[part] = {}
            elif not isinstance(child, MutableMapping):
                raise ValueError(f"override {item!r}: '{'.'.join(parts[: i + 1])}' is {_show(child)}, not a mapping")
            node = child
        node[parts[-1]] = value
    return result


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML would otherwise resolve silently (last wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            # `<<: *anchor` entries may legitimately be overridden; non-scalar keys are left to PyYAML.
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str) -> Mapping[str, Any]:
    # through bikd.storage: an S3 endpoint that never answers fails with a StorageError naming the file
    try:
        text = read_url(path).decode("utf-8")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config file not found: {path}") from e
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"invalid YAML in config file {path}{where}: {getattr(e, 'problem', None) or e}") from e
    if data is None:  # an empty file means "all defaults"
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"config file {path}: the top level must be a mapping of keys to values, got {_show(data)}")
    return data


def load_config(cls: type[T], path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults <- YAML file at ``path`` (any fsspec URL, e.g. ``s3://bucket/job.yaml``) <- overrides."""
    data = _read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Gives every entry point the same ``--config``/``--set`` interface; read back with ``config_from_args``."""
    parser.add_argument("--config", metavar="PATH", default=None, help="YAML config file: local path or fsspec URL")
    # default None, not []: argparse would append into one default list shared by every parse
    help_set = "override one value after --config: dotted key, YAML value (e.g. eval.batch_size=512); repeatable"
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=None, help=help_set)
    return parser


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Builds ``cls`` from the arguments that ``add_config_args`` added."""
    return load_config(cls, args.config, args.overrides or ())
