"""The ``key=value`` command lines of the ``editlab <command>`` subcommands.

The stream itself is configured through Hydra; its subcommands (plot, compare, report, export,
snapshot, probe, train-mend) take the same ``key=value`` form without composing a config.  A command lists its
arguments with their defaults, and a default's type says how a value is read: a list takes
``key=[a,b]`` or the key repeated (the values add up, replacing the default), a bool takes
true/false, an int or float must parse as one, and anything else stays the string as typed — a
path or a W&B filter expression is never reinterpreted (YAML would read ``12:30`` as a number).
"""
from __future__ import annotations

from typing import Any, Sequence

_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


class UsageError(ValueError):
    """A command line the command cannot take; its ``main`` prints it and returns 2."""


def key_values(argv: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(key, value)`` of every argument, in order (a value may itself contain ``=``)."""
    pairs = []
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {a!r}")
        pairs.append((key, value))
    return pairs


def parse_args(argv: Sequence[str], defaults: dict[str, Any], required: Sequence[str] = (),
               usage: str = "") -> dict[str, Any]:
    """Every key of ``defaults``, with the values ``argv`` gives (see the module doc); an unknown
    key, a value of the wrong type or a missing ``required`` key is a :class:`UsageError`."""
    args = {k: list(v) if isinstance(v, list) else v for k, v in defaults.items()}
    given: set[str] = set()
    for key, value in key_values(argv):
        if key not in defaults:
            raise UsageError(f"unknown argument {key!r}; known: {', '.join(defaults)}")
        default = defaults[key]
        if isinstance(default, list):
            bracketed = value.startswith("[") and value.endswith("]")
            items = [v.strip() for v in value[1:-1].split(",")] if bracketed else [value]
            args[key] = (args[key] if key in given else []) + [v for v in items if v]
        else:
            args[key] = _scalar(key, value, type(default))
        given.add(key)
    missing = [k for k in required if not args[k]]
    if missing:
        raise UsageError(f"missing {' '.join(f'{k}=' for k in missing)}; usage: {usage}")
    return args


def _scalar(key: str, value: str, kind: type) -> Any:
    if kind is bool:
        if value.lower() not in _TRUE + _FALSE:
            raise UsageError(f"{key}={value}: expected true or false")
        return value.lower() in _TRUE
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise UsageError(f"{key}={value}: expected {'an integer' if kind is int else 'a number'}") from None
    return value
