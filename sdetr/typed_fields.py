"""Dataclass fields checked and parsed by their annotated types.

Used by every config dataclass (``ModelConfig``, ``StageConfig``, ``TrainConfig``,
``SyntheticSpec``) so that a value of the wrong type is refused where it enters, with the
field's name, instead of surfacing later as a wrong result (the string ``'false'`` is truthy)
or a raw error deep inside the model. Supported annotations: ``bool``, ``int``, ``float``,
``str``, ``None``, ``Literal[...]``, unions of these, ``tuple[X, ...]``, ``dict[...]``
(a mapping, not looked into) and nested dataclasses with a ``from_dict`` classmethod.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

from sdetr.errors import UserError

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


class ConfigError(UserError, ValueError):
    """A config field that does not exist, or a value of the wrong type or out of range."""


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a dataclass (in field order)."""
    if cls not in _FIELD_TYPES:
        hints = typing.get_type_hints(cls)
        _FIELD_TYPES[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _FIELD_TYPES[cls]


def unknown_field_message(cls: type, name: str) -> str:
    """``"ModelConfig has no field 'hiden_dim' (did you mean 'hidden_dim'?); valid fields: ..."``."""
    valid = list(field_types(cls))
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{cls.__name__} has no field {name!r}{hint}; valid fields: {', '.join(valid)}"


def check_names(cls: type, names: Sequence[str] | Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for the first name that is not a field of ``cls``."""
    known = field_types(cls)
    for name in names:
        if not isinstance(name, str) or name not in known:
            raise ConfigError(unknown_field_message(cls, str(name)))


def describe(hint: Any) -> str:
    """A type annotation in words: ``int | tuple[int, ...]`` -> ``"an integer or a tuple of integers"``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is tuple:
        return f"a tuple of {describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict or hint is dict:
        return "a dict"
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "None"}
    if hint in words:
        return words[hint]
    return f"a {getattr(hint, '__name__', hint)}"


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against ``hint`` and normalised (lists -> tuples, ints -> floats for a float
    field, dicts -> nested dataclasses).

    Raises:
        ConfigError: naming ``where`` (the field), the value and the expected type.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        errors: list[tuple[Any, ConfigError]] = []
        for option in args:
            try:
                return coerce(value, option, where)
            except ConfigError as failed:
                errors.append((option, failed))
        for option, option_error in errors:  # a list for a tuple option: its own error names the bad element
            if isinstance(value, (list, tuple)) and typing.get_origin(option) is tuple:
                raise option_error
        raise _mismatch(value, hint, where)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _mismatch(value, hint, where)
    if origin is tuple:
        if isinstance(value, (list, tuple)):
            element = args[0] if args else Any
            return tuple(coerce(v, element, f"{where}[{i}]") for i, v in enumerate(value))
        raise _mismatch(value, hint, where)
    if origin is dict or hint is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise _mismatch(value, hint, where)
    if hint is type(None):
        if value is None:
            return None
        raise _mismatch(value, hint, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(value, hint, where)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _mismatch(value, hint, where)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise _mismatch(value, hint, where) from None
            if math.isfinite(number):
                return number
        raise _mismatch(value, hint, where)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _mismatch(value, hint, where)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            from_dict = getattr(hint, "from_dict", None)
            if from_dict is not None:
                return from_dict(value, where=where)
            check_names(hint, value)
            return hint(**value)
        raise _mismatch(value, hint, where)
    raise TypeError(f"{where}: unsupported annotation {hint!r}")  # a bug in a config class, not user input


def _mismatch(value: Any, hint: Any, where: str) -> ConfigError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ConfigError(f"{where}: expected {describe(hint)}, got {shown} ({type(value).__name__})")


def check_fields(instance: Any) -> None:
    """Check (and normalise in place) every field of a dataclass instance against its annotation.

    Works on frozen dataclasses (call it from ``__post_init__``).
    """
    for name, hint in field_types(type(instance)).items():
        value = coerce(getattr(instance, name), hint, name)
        object.__setattr__(instance, name, value)


def parse_value(raw: str, hint: Any, where: str) -> Any:
    """Text (a command-line ``--set FIELD=VALUE``) -> a value of type ``hint``.

    bool: true/false, 1/0, yes/no, on/off in any case; None: none or null; strings and
    literals: bare or quoted; tuples: ``1,2,4`` or ``(1, 2, 4)``; numbers: Python syntax.

    Raises:
        ConfigError: the text is not a value of that type.
    """
    text = raw.strip()
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return parse_value(text, option, where)
            except ConfigError:
                continue
        raise _parse_error(raw, hint, where)
    if origin is Literal or hint is str:
        return coerce(_unquote(text), hint, where)
    if hint is bool:
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise _parse_error(raw, hint, where)
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise _parse_error(raw, hint, where) from None
    if hint is float:
        try:
            number = float(text)
        except ValueError:
            raise _parse_error(raw, hint, where) from None
        return coerce(number, float, where)
    if origin is tuple:
        if text.startswith(("(", "[")):
            return coerce(_literal(raw, hint, where), hint, where)
        element = args[0] if args else str
        parts = [p for p in text.split(",") if p.strip()]
        return tuple(parse_value(p, element, f"{where}[{i}]") for i, p in enumerate(parts))
    return coerce(_literal(raw, hint, where), hint, where)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _literal(raw: str, hint: Any, where: str) -> Any:
    try:
        return ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise _parse_error(raw, hint, where) from None


def _parse_error(raw: str, hint: Any, where: str) -> ConfigError:
    return ConfigError(f"{where}: expected {describe(hint)}, got {raw!r}")


def parse_assignments(cls: type, items: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    """``["hidden_dim=128", "norm_first=false"]`` -> ``{"hidden_dim": 128, "norm_first": False}``,
    each value parsed by the type of ``cls``'s field.

    Raises:
        ConfigError: an item without ``=``, an unknown field (with the closest name and the
            valid ones) or a value that does not parse (naming the item).
    """
    hints = field_types(cls)
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected FIELD=VALUE, e.g. {flag} hidden_dim=128")
        if key not in hints:
            raise ConfigError(f"{flag} {item}: {unknown_field_message(cls, key)}")
        try:
            values[key] = parse_value(raw, hints[key], key)
        except ConfigError as error:
            raise ConfigError(f"{flag} {item}: {error}") from None
    return values
