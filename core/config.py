"""Stage configs: a dataclass is the schema, merged from defaults, a YAML file, `key=value` overrides and flags.

Every stage (train, export, index build / add, serve, eval, demo) has a config dataclass (or one derived from its
options, see `asymsearch.cli.options.bind_config`). Its merged value is built in this order, each layer over the
one before:

    the dataclass's defaults  <  --config FILE.yaml  <  key=value on the command line  <  explicit --flags

An explicit flag wins over a `key=value` of the same key: the flag is the more specific spelling and the one older
scripts use, so adding `key=value` overrides never changes what an existing command line does. Keys of nested
dataclasses are dotted (`addons.metrix=input`).

Bad input is refused before any work, as a `UserError` of one line: a key the schema does not have (naming the
closest valid keys), a value of the wrong type (`epochs=ten`), a required key that no layer set, an unreadable file.

The merged config is saved beside what the stage made (`save_config`): `NAME.pt.config.yaml` beside a
checkpoint `NAME.pt`, `NAME.onnx.config.yaml` beside an ONNX model, `config.yaml` inside an index folder. Loading that file back with
`--config` reproduces the same config. This module is the ground floor: it imports no stage.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, GrammarParseError, MissingMandatoryValue,
                              OmegaConfBaseException, ValidationError)

from asymsearch.core.errors import UserError

__all__ = ["CONFIG_FILE", "MISSING", "config_path_for", "schema_fields", "merge_config", "to_object", "to_plain",
           "save_config", "load_config_file", "config_yaml", "parse_overrides"]

CONFIG_FILE = "config.yaml"  # inside an index folder (each version has its own)
CONFIG_SUFFIX = ".config.yaml"  # beside a file artifact: NAME.pt -> NAME.pt.config.yaml


def config_path_for(artifact: str | os.PathLike) -> Path:
    """Where the config that made `artifact` is saved: `DIR/config.yaml` for an index folder, else the file's
    name + `.config.yaml` (`teacher.pt.config.yaml`, `teacher.onnx.config.yaml`: a checkpoint and its export
    usually share a stem). A model manifest `NAME.json` answers for its `NAME.onnx`."""
    path = Path(artifact)
    if path.is_dir():
        return path / CONFIG_FILE
    if path.suffix == ".json":
        path = path.with_suffix(".onnx")
    return path.with_name(path.name + CONFIG_SUFFIX)


@dataclasses.dataclass(frozen=True)
class SchemaField:
    key: str  # dotted path
    type: Any  # the annotation, resolved
    default: Any  # MISSING when required

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


def schema_fields(schema: type) -> dict[str, SchemaField]:
    """The leaf keys of a config dataclass (nested dataclasses flattened to dotted keys), in declaration order."""
    out: dict[str, SchemaField] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        inner = _optional_inner(kind)
        if dataclasses.is_dataclass(inner):
            for key, sub in schema_fields(inner).items():
                out[f"{f.name}.{key}"] = sub if default is None or default is MISSING else dataclasses.replace(
                    sub, default=_get(default, key))
            continue
        out[f.name] = SchemaField(f.name, kind, default)
    return out


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _optional_inner(kind: Any) -> Any:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return kind


def _type_name(kind: Any) -> str:
    inner = _optional_inner(kind)
    name = getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
    return f"{name} or null" if inner is not kind else name


def parse_overrides(items: Iterable[str]) -> list[str]:
    """Check the `key=value` items of a command line (one line naming a malformed one)."""
    items = list(items)
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip() or key.startswith("-"):
            raise UserError(f"override {item!r} must read KEY=VALUE (e.g. epochs=3)")
    return items


def _unknown_key(schema: type, key: str, source: str) -> UserError:
    keys = list(schema_fields(schema))
    groups = sorted({k.split(".")[0] for k in keys if "." in k})
    close = difflib.get_close_matches(key, keys + groups, n=3, cutoff=0.6)
    if not close:  # a dotted key may only have its last part wrong, or be a leaf given without its section
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] in difflib.get_close_matches(
            leaf, [k.rsplit(".", 1)[-1] for k in keys], n=3, cutoff=0.6)][:3]
    hint = f"; closest valid keys: {', '.join(close)}" if close else f"; valid keys: {', '.join(keys[:12])}" + (
        ", ..." if len(keys) > 12 else "")
    return UserError(f"unknown config key {key!r} ({source}) for {schema.__name__}{hint}")


def _bad_value(schema: type, e: OmegaConfBaseException, source: str) -> UserError:
    key = getattr(e, "full_key", None) or ""
    field = schema_fields(schema).get(key)
    first = str(getattr(e, "msg", None) or e).strip().splitlines()[0]
    if field is not None:
        return UserError(f"config key {key} must be {field.type_name} ({source}): {first}")
    return UserError(f"config key {key or '?'} ({source}): {first}")


def _merge(schema: type, cfg: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return typing.cast(DictConfig, OmegaConf.merge(cfg, layer))
    except (ConfigKeyError, ConfigAttributeError) as e:
        raise _unknown_key(schema, getattr(e, "full_key", None) or str(e), source) from None
    except (ValidationError, OmegaConfBaseException) as e:
        raise _bad_value(schema, e, source) from None


def load_config_file(path: str | os.PathLike) -> DictConfig:
    """A YAML mapping of keys, read with one clear line for a missing, unreadable or non-mapping file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = OmegaConf.load(path)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    except Exception as e:  # yaml.YAMLError, GrammarParseError: both name the line
        first = " ".join(str(e).split())
        raise UserError(f"config file {path} is not valid YAML: {first[:200]}") from None
    if not isinstance(data, DictConfig):
        raise UserError(f"config file {path} must hold a mapping of keys (key: value lines), not a list")
    return data


def merge_config(schema: type, *, file: str | os.PathLike | None = None, overrides: Iterable[str] = (),
                 explicit: Mapping[str, Any] | None = None, require: bool = True) -> DictConfig:
    """The schema's defaults, then `file`, then the `key=value` `overrides`, then `explicit` (dotted key -> value,
    the flags the user gave). Type-checked against `schema`; `UserError` of one line on bad input. With `require`,
    every key without a default must be set by some layer."""
    cfg = OmegaConf.structured(schema)
    if file is not None:
        cfg = _merge(schema, cfg, load_config_file(file), f"in {file}")
    items = parse_overrides(overrides)
    if items:
        try:
            dotlist = OmegaConf.from_dotlist(items)
        except GrammarParseError as e:
            raise UserError(f"cannot parse the override {' '.join(str(e).split())[:200]}") from None
        cfg = _merge(schema, cfg, dotlist, "key=value on the command line")
    if explicit:
        nested: dict[str, Any] = {}
        for key, value in explicit.items():
            node = nested
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = to_plain(value)
        cfg = _merge(schema, cfg, OmegaConf.create(nested), "from a command-line flag")
    if require:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise UserError(f"missing required config key{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
                            f"give {'them' if len(missing) > 1 else 'it'} as a flag, as KEY=VALUE or in --config")
    return cfg


def to_object(cfg: DictConfig) -> Any:
    """The schema's dataclass instance (nested ones included) for a merged config."""
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise UserError(f"missing required config key {e.full_key}") from None


def to_plain(value: Any) -> Any:
    """A value as YAML-safe plain data: dataclasses and DictConfigs to dicts, paths to strings, tuples to lists."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def config_yaml(config: Any) -> str:
    """The YAML text of a config (a dataclass instance, a DictConfig or a mapping)."""
    return OmegaConf.to_yaml(OmegaConf.create(to_plain(config)))


def save_config(config: Any, path: str | os.PathLike) -> Path:
    """Write `config` as YAML at `path` through a temporary file and a rename (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(config_yaml(config), encoding="utf-8")
    os.replace(tmp, path)
    return path
