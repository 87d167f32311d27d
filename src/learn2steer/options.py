"""Config dataclasses from YAML files and overrides, type-checked field by field.

Every command's settings are a dataclass (``EvalConfig``, ``TrainJob``, ...). The dataclass is the one
schema: the CLI's options are generated from its fields, and a YAML config's keys are its field names
(a nested dataclass field takes a mapping). :func:`build` merges defaults <- file <- overrides and
checks every value against the field's type, so ``tiny: "no"`` or ``layers: ten`` is an error naming
the key, and a list in YAML stays a list (never split into characters).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, TypeVar, Union, cast, get_args, get_origin

import yaml

from learn2steer.errors import InvalidInputError, MissingFileError

T = TypeVar("T")


_HINTS: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each dataclass field of ``cls`` (cached: every config's __post_init__ asks)."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]
    return False, tp


def choices(tp: Any) -> tuple[Any, ...]:
    """The values a fixed-choice type allows: a ``Literal``'s arguments (None around it aside); () otherwise.

    The one source of every fixed choice (engine, task, scope, split, dtype, ...): the CLI shows these as the
    option's choices, :func:`coerce` and :func:`check_choices` refuse anything else.
    """
    tp = _optional(tp)[1]
    return get_args(tp) if get_origin(tp) is Literal else ()


def check_choice(tp: Any, value: Any, what: str) -> Any:
    """``value`` when the fixed-choice type ``tp`` allows it; else one sentence listing the choices."""
    if value is None and _optional(tp)[0]:
        return value
    allowed = choices(tp)
    if value not in allowed:
        raise InvalidInputError(f"{what} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return value


def check_choices(obj: Any) -> None:
    """Check every fixed-choice field of the dataclass ``obj``: a config built in Python (``EvalConfig(task=
    "x")``) skips :func:`build`, so its ``__post_init__`` calls this, and both paths refuse the same values."""
    for name, tp in field_types(type(obj)).items():
        if choices(tp):
            check_choice(tp, getattr(obj, name), name)


def describe(tp: Any) -> str:
    """A type as a user reads it ("a whole number", "a list of numbers", ...)."""
    optional, tp = _optional(tp)
    origin = get_origin(tp)
    if tp is bool:
        text = "true or false"
    elif tp is int:
        text = "a whole number"
    elif tp is float:
        text = "a number"
    elif tp in (str, Path):
        text = "a string"
    elif origin is list:
        text = f"a list of {describe(get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    elif origin is Literal:
        text = "one of " + ", ".join(map(repr, get_args(tp)))
    elif dataclasses.is_dataclass(tp):
        text = "a mapping of " + ", ".join(f.name for f in dataclasses.fields(tp))
    else:
        text = str(tp)
    return text + (" (or null)" if optional else "")


def coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` checked (and gently converted: "1e-4" -> 1e-4, "10,12" -> [10, 12]) as type ``tp``."""
    optional, inner = _optional(tp)
    if value is None:
        if optional:
            return None
        raise InvalidInputError(f"{where} must be {describe(tp)}, got null")
    tp = inner
    origin = get_origin(tp)
    bad = InvalidInputError(f"{where} must be {describe(tp)}, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise bad
        return Path(value)
    if origin is list:
        (item,) = get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        return check_choice(tp, value, where)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, Mapping):
            raise bad
        return build(cast(type, tp), value, where=where)
    return value


def build(cls: type[T], *layers: Mapping[str, Any] | None, where: str = "config") -> T:
    """An instance of dataclass ``cls`` from its defaults overridden by each mapping in ``layers`` in turn.

    Keys are field names; a nested dataclass field takes a mapping (merged key by key). Unknown keys are
    an error listing the valid ones.
    """
    types_ = field_types(cls)
    names = [f.name for f in dataclasses.fields(cast(Any, cls))]
    values: dict[str, Any] = {}
    for layer in layers:
        if not layer:
            continue
        layer = _unflatten(cls, layer)
        unknown = sorted(set(layer) - set(names))
        if unknown:
            raise InvalidInputError(f"{where} has unknown keys {unknown}; valid keys: {', '.join(names)}")
        for k, v in layer.items():
            tp = _optional(types_[k])[1]
            if dataclasses.is_dataclass(tp) and isinstance(v, Mapping) and isinstance(values.get(k), Mapping):
                values[k] = {**values[k], **v}
            else:
                values[k] = v
    checked = {k: coerce(types_[k], v, f"{where} key {k!r}") for k, v in values.items()}
    try:
        return cls(**checked)
    except TypeError as e:
        raise InvalidInputError(f"{where}: {e}") from None


def _unflatten(cls: type, layer: Mapping[str, Any]) -> dict[str, Any]:
    """``layer`` with flat spellings of nested options moved into their group: ``chair_images: 500`` is
    ``chair_data: {images: 500}`` when the group ``chair_data`` has the prefix ``chair`` (the command line's
    spelling, ``--chair-images``), and a group's ``aliases`` (old flat names, e.g. ``tiny``) are accepted too."""
    groups = [(f, _optional(field_types(cls)[f.name])[1]) for f in dataclasses.fields(cast(Any, cls))]
    groups = [(f, tp) for f, tp in groups if dataclasses.is_dataclass(tp)]
    names = {f.name for f in dataclasses.fields(cast(Any, cls))}
    out: dict[str, Any] = {}
    for key, value in layer.items():
        target = None
        if key not in names:
            for f, tp in groups:
                sub = {g.name for g in dataclasses.fields(tp)}
                rest = key.removeprefix(f"{f.metadata.get('prefix', f.name)}_")
                if rest != key and rest in sub:
                    target = (f.name, rest)
                elif key in getattr(tp, "aliases", {}):
                    target = (f.name, tp.aliases[key])
                if target:
                    break
        if target is None:
            out[key] = value
        else:
            node = out.setdefault(target[0], {})
            if isinstance(node, Mapping):
                out[target[0]] = {**node, target[1]: value}
    return out


def group_options(cls: type, group: str, prefix: str, source: Any = None, flat: Mapping[str, Any] | None = None,
                  *, where: str) -> Any:
    """A registry member's own options (an instance of ``cls``): taken from ``source`` (an instance, a mapping of
    its fields, or settings / a mapping holding it under ``group``), with ``flat`` keyword spellings on top
    (``<prefix>_<option>``, or one of ``cls.aliases``); keys that are not its options are left alone."""
    own = source
    if own is not None and not isinstance(own, (cls, Mapping)):
        own = getattr(own, group, None)
    elif isinstance(own, Mapping) and group in own:
        own = own[group]
    mine: dict[str, Any] = {}
    sub = {f.name for f in dataclasses.fields(cls)}
    for key, value in (flat or {}).items():
        rest = getattr(cls, "aliases", {}).get(key, key.removeprefix(f"{prefix}_"))
        if rest in sub:
            mine[rest] = value
    if own is None or isinstance(own, Mapping):
        return build(cls, own, mine, where=where)
    return dataclasses.replace(own, **{k: coerce(field_types(cls)[k], v, f"{where} key {k!r}")
                                       for k, v in mine.items()}) if mine else own


def flat_names(groups: Iterable[tuple[type, str]]) -> set[str]:
    """Every flat keyword spelling (``<prefix>_<option>`` and aliases) of the option groups ``(class, prefix)``."""
    out: set[str] = set()
    for cls, prefix in groups:
        out |= {f"{prefix}_{f.name}" for f in dataclasses.fields(cls)} | set(getattr(cls, "aliases", {}))
    return out


def load_entry_points(group: str) -> None:
    """Import every installed package's entry point of ``group`` (``learn2steer.datasets``, ``learn2steer.tasks``):
    the modules that register their members, loaded before a registry's option groups are built."""
    import importlib.metadata

    for ep in importlib.metadata.entry_points(group=group):
        ep.load()


def with_groups(base: type[T], groups: Mapping[str, tuple[type, str, str]], name: str) -> type[T]:
    """A dataclass ``name`` with ``base``'s fields plus one nested options group per entry of ``groups``
    (field name -> (options dataclass, command-line prefix, help)).

    How an open registry (datasets, tasks) gets its members' own options into the one schema: each member
    declares a dataclass, and the commands' settings are built with a group per member, so its options appear in
    ``--help`` (``--<prefix>-<option>``), YAML (``<field>: {option: ...}`` or the flat ``<prefix>_<option>``) and
    Python with no edit of the settings class, the pipeline or the CLI.
    """
    fields = [(fname, tp, dataclasses.field(default_factory=tp, metadata={"prefix": prefix, "help": help_}))
              for fname, (tp, prefix, help_) in groups.items()]
    cls = dataclasses.make_dataclass(name, fields, bases=(base,))
    cls.__module__ = base.__module__
    cls.__doc__ = base.__doc__
    return cast(type[T], cls)


def read_config(config: str | Path) -> dict[str, Any]:
    """A YAML config file, or a shipped one by name (``l2s configs`` lists them)."""
    path = Path(config)
    if path.exists():
        text = path.read_text()
    else:
        res = resources.files("learn2steer.data.configs") / str(config)
        if not res.is_file():
            raise MissingFileError(f"config {str(config)!r} not found (a YAML path, or a shipped name from "
                                   "`l2s configs`)")
        text = res.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidInputError(f"config {str(config)!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInputError(f"config {str(config)!r} must be a mapping of option names to values")
    return data


def finite(values: list[float], what: str) -> list[float]:
    """Refuse NaN / inf in a list of numbers (strengths, fractions)."""
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise InvalidInputError(f"{what} must be finite numbers, got {bad}")
    return values


def as_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able data (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(obj).items()}
