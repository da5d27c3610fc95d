"""Typed, frozen dataclasses loaded from TOML tables, with every problem reported.

The config and the scenario files share this: a field's metadata holds its
bounds, choices and whether it is a path; `load_table` walks a dataclass once,
collecting *every* unknown key, wrong type and out-of-range value (so a person
fixes a file in one pass), and resolves relative paths against a base folder.
"""

from __future__ import annotations

import re
import tomllib
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from firmware_py.core.types import is_finite_number, is_whole_number
from firmware_py.errors import InputError
from firmware_py.files import read_text
from firmware_py.quoting import limit_text, out_of_range, shown, shown_text


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """The table in a TOML file (a regular file of bounded size); InputError otherwise."""
    try:
        text = read_text(path, what)
    except FileNotFoundError:
        raise InputError(f"{path}: cannot read the {what}: no such file") from None
    return parse_toml(text, str(path))


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """TOML text as a table; every way the parser can give up is one clear InputError.

    tomllib raises ValueError beyond its own TOMLDecodeError for integers of more
    than 4,300 digits, and RecursionError for arrays nested thousands deep. A leading
    byte-order mark (some editors write one) is no TOML, but says nothing either: dropped.
    """
    try:
        return tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{source}: not valid TOML: {shown_text(str(err), 200)}") from None
    except ValueError:
        raise InputError(f"{source}: not valid TOML: a number has more than 4,300 digits") from None
    except RecursionError:
        raise InputError(f"{source}: not valid TOML: arrays or tables nested too deeply") from None


def spec(default: Any, *, lo: float | None = None, hi: float | None = None,
          choices: tuple[str, ...] | None = None, path: bool = False, private: bool = False,
          form: tuple[str, str] | None = None, unset: float | None = None, doc: str = "", bound_why: str = "",
          entry: str = "", query: bool = False) -> Any:
    """A schema field: default (`...` = required), inclusive bounds, allowed strings, is it a path (and
    a private file's: a secret the gateway refuses to read through a symbolic link, `absolute_path`), and
    the form a string must have (a regular expression, and how to say it to a person).

    `unset` is the one value outside the bounds that means "not set" (e.g. -1). It is named
    exactly, not as a wider range, so that a mistyped sign (-0.5 for 0.5) is refused instead
    of silently switching the setting off. `bound_why` is said with an out-of-range value, where a bound
    is not obvious (a limit another part of the system sets). `entry` says what each value of a table of
    strings is (`'MESSAGE.SIGNAL'`), named with a value of another type. `query`: a URL key whose endpoint
    may be named with a query (`?p=policy`), shown and logged with it hidden (`quoting.without_query`)."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "path": path, "private": private, "form": form, "unset": unset,
            "doc": doc, "bound_why": bound_why, "entry": entry, "query": query}
    if default is ...:
        return field(metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def given_by_loader(default: Any) -> Any:
    """A field the loader fills in (where the file came from), never a key of the file itself."""
    return field(default=default, metadata={"given_by_loader": True})


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why `value` does not fit type `hint`, or None when it does."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            return f"expected a list, got {type(value).__name__}"
        bad = [v for v in value if _type_problem(v, item)]
        return f"list items must be {item.__name__}, got {shown(bad[0])}" if bad else None
    if origin is dict:  # each entry's own type is checked by `_entry_problems`, naming the entry
        return None if isinstance(value, dict) else f"expected a table, got {shown(value)}"
    if hint is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {shown(value)}"
    if hint is float:
        return None if is_finite_number(value) else f"expected a finite number, got {shown(value)}"
    if hint is int:
        return None if is_whole_number(value) else f"expected an integer, got {shown(value)}"
    return None if isinstance(value, hint) else f"expected a {hint.__name__}, got {shown(value)}"


def absolute_path(base: Path, value: str, *, private: bool = False) -> str:
    """`value` as an absolute path, relative ones from `base` (the configuration's folder), resolved: the
    journal and every file kept beside it are named from its real place, whatever link led there.

    A private file's own name is never resolved (its folders are): a secret given as a symbolic link must
    still be seen as one, and refused, where it is opened, as when the configuration names it absolutely."""
    path = Path(value)
    if path.is_absolute():
        return value
    joined = base / path
    if not private or joined.name in ("", ".", ".."):
        return str(joined.resolve())
    return str(joined.parent.resolve() / joined.name)


def load_table(cls: type, table: dict[str, Any], prefix: str, base: Path, problems: list[str]) -> Any:
    """An instance of dataclass `cls` from `table`; problems go to `problems` as "key: reason"."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init and not f.metadata.get("given_by_loader")}
    for key in table:
        if key not in known:
            problems.append(f"{prefix}{shown_text(key)}: unknown key (expected one of: {', '.join(known)})")
    values: dict[str, Any] = {}
    for name, f in known.items():
        key = f"{prefix}{name}"
        if name not in table:
            if f.default is MISSING and f.default_factory is MISSING:
                problems.append(f"{key}: missing (required)")
            continue
        value, hint = table[name], hints[name]
        if is_dataclass(hint):
            if isinstance(value, dict):
                values[name] = load_table(hint, value, f"{key}.", base, problems)
            else:
                problems.append(f"{key}: expected a table, got {shown(value)}")
            continue
        item = _table_list_item(hint)
        if item is not None:
            if isinstance(value, list) and all(isinstance(v, dict) for v in value):
                values[name] = tuple(load_table(item, v, f"{key}[{i}].", base, problems)
                                     for i, v in enumerate(value))
            else:
                problems.append(f"{key}: expected an array of tables ([[{key}]]), got {shown(value)}")
            continue
        problem = _type_problem(value, hint) or _range_problem(value, f.metadata)
        if not problem and typing.get_origin(hint) is dict:
            entry_problems = _entry_problems(value, key, f.metadata)
            if entry_problems:
                problems += entry_problems
                continue
        if not problem and f.metadata.get("path") and "\x00" in value:
            problem = f"{shown(value)} holds a NUL character, which no path can"
        if not problem and f.metadata.get("path") and not value and f.default:  # "" means "none" only where that is the default
            problem = f"must not be empty: the file is needed (default {f.default!r})"
        if not problem and name.endswith("_url") and isinstance(value, str):
            problem = _credentials_problem(value, query_allowed=f.metadata.get("query", False))
        if problem:
            problems.append(f"{key}: {problem}")
            continue
        if f.metadata.get("path") and value:
            value = absolute_path(base, value, private=f.metadata.get("private", False))
        values[name] = value
    try:
        return cls(**values)
    except TypeError:  # a required key was missing: already reported above
        return None


def _entry_problems(table: dict[str, Any], key: str, meta: typing.Mapping[str, Any]) -> list[str]:
    """Each entry of a table of strings whose value is no string, named on its own: one wrong value must
    neither hide which entry it is nor the others' problems (docs/configuration.md: every one at once)."""
    said = f"a string ({meta['entry']})" if meta.get("entry") else "a string"
    return [f"{key}.{shown_text(k)}: expected {said}, got {shown(v)}" for k, v in table.items()
            if not isinstance(v, str)]


def _credentials_problem(url: str, *, query_allowed: bool = False) -> str | None:
    """A URL key carrying a user name or password (`https://user:secret@host/`) or a query or fragment
    (`?api_key=...`): refused, the value never repeated, since a URL is printed and logged wherever its
    peer is named (commissioning's report, the installer page, each log line about the link) and a secret
    must never be. A base URL has no place for a query (the gateway adds its own paths to it); an endpoint
    some providers name with one (`query_allowed`) keeps it, hidden wherever the URL is shown."""
    where = "holds a user name or password (the part before '@' in the host" if "@" in _authority(url) else \
        "holds a query or fragment (the part from '?' or '#'" if re.search(r"#" if query_allowed else r"[?#]", url) \
        else None
    if where is None:
        return None
    return (f"{where}; value not shown): a URL is printed and logged, so credentials go in the secret file "
            "(e.g. client_secret_file) or a client certificate, never in the URL; give the URL without them")


def _authority(url: str) -> str:
    """The part of `url` where a user name and password would go, read generously: also without a scheme
    or with a malformed one (`user:secret@host/path`, which `urlsplit` reads as scheme 'user' and no host),
    so that a URL refused elsewhere for its form is not printed back with its secret first."""
    rest = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*:", "", url.strip(), count=1).lstrip("/\\")
    return re.split(r"[/?#\\]", rest, maxsplit=1)[0]


def _table_list_item(hint: Any) -> type | None:
    """The dataclass of a `tuple[X, ...]` field (an array of tables), else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and args and is_dataclass(args[0]):
        return args[0]
    return None


def _range_problem(value: Any, meta: typing.Mapping[str, Any]) -> str | None:
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices and value not in choices:
        listed = ", ".join(c or '""' for c in choices)
        return f"must be one of {listed}, got {shown(value)}"
    unset = meta.get("unset")
    if unset is not None and value == unset:
        return None
    if lo is not None and value < lo or hi is not None and value > hi:
        also = f", or {limit_text(unset)} for not set" if unset is not None else ""
        why = f": {meta['bound_why']}" if meta.get("bound_why") else ""
        return out_of_range(value, lo, hi, also) + why
    form = meta.get("form")
    if form and not re.fullmatch(form[0], value):
        return f"expected {form[1]}, got {shown(value)}"
    return None
