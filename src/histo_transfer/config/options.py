"""Name-keyed option registries: each config choice (optimizer, augmentation, data source, ...) is
registered once, next to the code that builds it, with a dataclass of the keys its YAML may hold.

Config validation reads these registries, so an option's name, keys, types and ranges are stated
in one Python place. Importing this module, or a module that registers options, never imports
TensorFlow: mistakes are reported before the slow imports start.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from histo_transfer.config.errors import ConfigError


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False


def between(low=None, high=None, *, low_open: bool = False, high_open: bool = False):
    """A dataclass field whose value must lie in the range (closed unless said open)."""
    return dataclasses.field(metadata={"range": Range(low, high, low_open, high_open)})


def one_of(choices: "Options | tuple[str, ...]"):
    """A dataclass field whose value must be one of `choices` (a registry's names or a tuple)."""
    return dataclasses.field(metadata={"choices": choices})


@dataclass(frozen=True)
class Option:
    name: str
    value: Any  # what builds the option: a function or a class
    keys: type | None  # dataclass of the keys of its YAML; None: a plain value, no keys


class Options:
    """The options of one config choice, by name."""

    def __init__(self, where: str, check: Callable[[DictConfig, Any], None] | None = None):
        self.where = where  # the config key that names the option, e.g. `optimizer` or `trainer.strategy`
        self.check = check  # extra checks on a node beyond its keys (files exist, bounds agree, ...)
        self._options: dict[str, Option] = {}

    def register(self, name: str, keys: type | None = None):
        """Decorator: register the decorated function or class as option `name`."""
        def add(value):
            self.add(name, value, keys)
            return value
        return add

    def add(self, name: str, value, keys: type | None = None) -> None:
        if name in self._options:
            raise ValueError(f"{self.where} option {name!r} is registered twice")
        self._options[name] = Option(name, value, keys)

    def names(self) -> tuple[str, ...]:
        return tuple(self._options)

    def __contains__(self, name) -> bool:
        return name in self._options

    def __getitem__(self, name: str) -> Any:
        """What builds option `name`."""
        return self._options[name].value

    def validate(self, node: DictConfig) -> None:
        """The option named by `node.name` exists and `node` holds its keys, typed and in range."""
        name = node.name
        if name not in self._options:
            raise ConfigError(self.where, f"{name!r} is not an option; choose one of {', '.join(self._options)}")
        option = self._options[name]
        if option.keys is not None:
            check_keys(node, option.keys, self.where)
        if self.check is not None:
            self.check(node, option.value)

    def validate_name(self, value, where: str) -> None:
        """`value` names one of these options (for plain keys such as trainer.strategy)."""
        if value not in self._options:
            raise ConfigError(where, f"{value!r} is not one of {', '.join(self._options)}")


def check_keys(node: DictConfig, keys: type, where: str) -> None:
    """Types by OmegaConf (merging into the Structured Config `keys`), then the fields' ranges and choices.
    `where` is the node's dotted key, empty for the config's root."""
    plain = OmegaConf.create(OmegaConf.to_container(node, resolve=True, throw_on_missing=False))
    try:
        typed = OmegaConf.merge(OmegaConf.structured(keys), plain)
    except ValidationError as exc:
        raise ConfigError(_dotted(where, exc.full_key), _type_message(keys, str(exc.full_key), exc)) from exc
    for field in dataclasses.fields(keys):
        if OmegaConf.is_missing(typed, field.name):
            continue  # reported as a required key, with the others, by tasks.validation
        value, dotted = typed[field.name], _dotted(where, field.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(_field_type(keys, field.name)):
            check_keys(value, _field_type(keys, field.name), dotted)
        if "range" in field.metadata:
            check_range(value, dotted, field.metadata["range"], shown=plain[field.name])
        if "choices" in field.metadata:
            choices = field.metadata["choices"]
            names = choices.names() if isinstance(choices, Options) else tuple(choices)
            if value not in names:
                raise ConfigError(dotted, f"{value!r} is not one of {', '.join(names)}")


def _dotted(where: str, key) -> str:
    """`where.key`; a task's own keys sit at the config's root (`where` empty)."""
    return f"{where}.{key}" if where else str(key)


def check_range(value, dotted: str, bounds: Range, shown=None) -> None:
    """`value` lies within `bounds`; errors quote `shown` (the value as the user wrote it) when given."""
    shown = value if shown is None else shown
    low, high = bounds.low, bounds.high
    too_low = low is not None and (value <= low if bounds.low_open else value < low)
    too_high = high is not None and (value >= high if bounds.high_open else value > high)
    if not (too_low or too_high):
        return
    name = dotted.rsplit(".", 1)[-1]
    if isinstance(value, Integral) and high is None and not bounds.low_open:
        raise ConfigError(dotted, f"{shown} is too small; need at least {low}")
    lo = "" if low is None else f"{low} {'<' if bounds.low_open else '<='} "
    hi = "" if high is None else f" {'<' if bounds.high_open else '<='} {high}"
    raise ConfigError(dotted, f"{shown} is out of range; need {lo}{name}{hi}")


def _field_type(keys: type, name: str):
    hint = typing.get_type_hints(keys)[name]
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    return arguments[0] if arguments and typing.get_origin(hint) is typing.Union else hint


def _type_message(keys: type, full_key: str, exc: ValidationError) -> str:
    value = getattr(exc, "value", None)
    try:
        wanted = _field_type(keys, full_key.split(".")[0])
    except KeyError:
        return str(exc).splitlines()[0]
    got = f", got {value!r}" if value is not None else ""
    if wanted is bool:
        return f"must be true or false{got}"
    if wanted is int:
        return f"must be a whole number{got}"
    if wanted is float:
        return f"must be a number{got}"
    return str(exc).splitlines()[0]

