"""Typed dataclass configs <-> YAML dicts <-> command-line flags.

One dataclass tree serves the Python API, YAML files and ``--help`` (the litgpt habit):
a top-level config is a dataclass whose fields are *sections* (dataclasses); every field
of a section becomes a flag ``--field-name`` (``--section-field-name`` where two sections
share a field name, e.g. ``--adapter-seed``), and also ``--section.field`` (``--adapter.r``:
torchrun's parser mistakes ``--r`` for an abbreviation of its own options). Values are checked against the type hints
here and then by each section's ``__post_init__``, so every error names the option.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union

import yaml


def opt(default: Any, help: str, *, bare: Any = None) -> Any:
    """A dataclass field with a default and a help string for ``--help``; ``bare`` is the
    value of its flag given alone (``--gguf`` for ``--gguf q8_0``)."""
    metadata = {"help": help} if bare is None else {"help": help, "bare": bare}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def sections(cls: type) -> dict[str, type]:
    """Section name -> section dataclass of a top-level config class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _default_values(field: dataclasses.Field) -> dict[str, Any]:
    """The values of a section field's default instance (a top-level config may set its
    own section defaults, e.g. ``dude eval`` evaluates heldout and mmlu by default)."""
    if field.default_factory is dataclasses.MISSING:
        return {}
    try:
        return dataclasses.asdict(field.default_factory())
    except ValueError:  # a section with required options has no default instance
        return {}


# ----------------------------------------------------------------------------- values


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        return (args[0] if len(args) == 1 else Union[tuple(args)]), optional
    return hint, False


def coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked (and mildly converted: int->float, "1e-4"->float, tuple->list)
    against ``hint``; a ``ValueError`` naming ``name`` otherwise."""
    inner, optional = _unwrap_optional(hint)
    if value is None:
        if optional:
            return None
        raise ValueError(f"option {name} may not be empty (null)")
    origin = typing.get_origin(inner)
    if origin in (Union, types.UnionType):  # e.g. list[str] | str: the first that fits
        for alternative in typing.get_args(inner):
            try:
                return coerce(name, value, alternative)
            except ValueError:
                continue
        raise ValueError(f"option {name}: {value!r} is not a {inner}")
    if origin is Literal:
        if value not in typing.get_args(inner):
            raise ValueError(f"option {name} must be one of {list(typing.get_args(inner))}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ValueError(f"option {name} must be a list, got {value!r}")
        (item,) = typing.get_args(inner) or (Any,)
        return [coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"option {name} must be a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(inner)
        return {coerce(name, k, key_hint): coerce(f"{name}.{k}", v, value_hint) for k, v in value.items()}
    return _coerce_scalar(name, value, inner)


def _coerce_scalar(name: str, value: Any, hint: Any) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"option {name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"option {name} must be an integer, got {value!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise ValueError(f"option {name} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ValueError(f"option {name} must be a string, got {value!r}")
    raise TypeError(f"option {name}: unsupported type {hint}")  # a bug in a config class


# ----------------------------------------------------------------------------- dicts


def build(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """An instance of the dataclass ``cls`` (sections built recursively) from a dict;
    unknown keys and badly typed values are refused with the option's name."""
    if not isinstance(data or {}, dict):
        raise ValueError(f"config {where.rstrip('.') or cls.__name__} must be a mapping, got {data!r}")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {[f'{where}{k}' for k in unknown]}; known in "
                         f"{where.rstrip('.') or 'the top level'}: {known}")
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                if not isinstance(value, dict):
                    raise ValueError(f"section {where}{name} must be a mapping of options, got {value!r}")
                value = build(hint, {**_default_values(fields[name]), **value}, f"{where}{name}.")  # an option replaces its default whole
            kwargs[name] = value
        else:
            kwargs[name] = coerce(f"{where}{name}", value, hint)
    return cls(**kwargs)  # __post_init__ errors name the option


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML / JSON)."""
    return dataclasses.asdict(config)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"--config {str(path)!r} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested dict update: ``overrides`` win, sections are merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- flags


def _flag_names(cls: type) -> dict[tuple[str, str], str]:
    """(section, field) -> flag, prefixed by the section where a field name repeats."""
    pairs = [(s, f.name) for s, scls in sections(cls).items() for f in dataclasses.fields(scls)]
    counts: dict[str, int] = {}
    for _, name in pairs:
        counts[name] = counts.get(name, 0) + 1
    return {(s, n): ("--" + (n if counts[n] == 1 else f"{s}_{n}").replace("_", "-")) for s, n in pairs}


def _parse_value(hint: Any) -> Any:
    inner, _ = _unwrap_optional(hint)
    if inner is str or typing.get_origin(inner) is Literal:
        return lambda text: None if text.lower() in ("none", "null") else text
    return lambda text: yaml.safe_load(text)  # numbers, null, true/false


def add_flags(parser: argparse.ArgumentParser, cls: type, help_fallback: dict[str, str] | None = None) -> None:
    """One flag per section field; defaults are suppressed so only given flags override."""
    flags = _flag_names(cls)
    top = {f.name: f for f in dataclasses.fields(cls)}
    for section, scls in sections(cls).items():
        group = parser.add_argument_group(f"{section} options (YAML section '{section}:')")
        hints = typing.get_type_hints(scls)
        section_defaults = _default_values(top[section])
        for f in dataclasses.fields(scls):
            hint, _ = _unwrap_optional(hints[f.name])
            default = section_defaults.get(f.name, f.default if f.default is not dataclasses.MISSING
                                           else f.default_factory() if f.default_factory is not dataclasses.MISSING
                                           else None)
            text = f.metadata.get("help") or (help_fallback or {}).get(f.name, "")
            if "bare" in f.metadata:
                text += f" (the flag alone: {f.metadata['bare']})"
            kwargs: dict[str, Any] = dict(dest=f"{section}.{f.name}", default=argparse.SUPPRESS,
                                          help=f"{text} (default: {default!r})".replace("%", "%%"))
            if hint is not bool:
                kwargs["metavar"] = f.name.upper()
            if hint is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(hint) is dict:
                kwargs.update(nargs="+", metavar="KEY=VALUE", type=_key_value)  # overrides the metavar
            elif typing.get_origin(hint) is list or (typing.get_origin(hint) in (Union, types.UnionType)
                                                      and list in map(typing.get_origin, typing.get_args(hint))):
                item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else str
                kwargs.update(nargs="*", type=_parse_value(item if item in (int, float) else str))  # none: []
            else:
                kwargs["type"] = _parse_value(hint)
                if "bare" in f.metadata:
                    kwargs.update(nargs="?", const=f.metadata["bare"])
                if typing.get_origin(hint) is Literal:
                    kwargs["choices"] = list(typing.get_args(hint))
            group.add_argument(flags[(section, f.name)], **kwargs)
            # also --section.field, kept out of --help: unambiguous under torchrun's own parser
            group.add_argument(f"--{section}.{f.name}", **{**kwargs, "help": argparse.SUPPRESS})


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def overrides_from(namespace: argparse.Namespace) -> dict[str, Any]:
    """The nested dict of the flags actually given."""
    out: dict[str, Any] = {}
    for dest, value in vars(namespace).items():
        if "." not in dest:
            continue
        section, name = dest.split(".", 1)
        if isinstance(value, list) and value and isinstance(value[0], tuple):
            value = dict(value)
        out.setdefault(section, {})[name] = value
    return out


def resolve(cls: type, config_path: str | None, namespace: argparse.Namespace,
            defaults_for: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Any:
    """YAML (if any) overridden by flags, built and validated. ``defaults_for(given)``: options
    that depend on the given ones, under them (``dude eval`` of a run folder: the run's data)."""
    given = merge(load_yaml(config_path) if config_path else {}, overrides_from(namespace))
    return build(cls, merge(defaults_for(given), given) if defaults_for else given)
