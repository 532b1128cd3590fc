"""The one TOML reader of the model, guide and dataset specs.

Finds a spec by path or bare name, parses it with :mod:`tomllib` and checks its tables key by
key. Every mistake is a :class:`SpecError` of one line naming the file, the table and the key
(a syntax error: the line and column). Needs no torch.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

from ._checks import is_finite, is_int

__all__ = ["SPECS_ENV", "SpecError", "Table", "display", "read", "resolve", "show", "specs_dir"]

SPECS_ENV = "CGPYRO_SPECS_DIR"


class SpecError(ValueError):
    """A model, guide or dataset spec that cannot be read: one line naming the file and key."""


def specs_dir() -> Path:
    """The directory holding ``models/``, ``guides/`` and ``data/``: ``$CGPYRO_SPECS_DIR``, else
    the source checkout's root, else the copy a wheel installs in ``cgpyro/_specs/``."""
    env = os.environ.get(SPECS_ENV)
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[1]
    if (root / "models").is_dir() and (root / "guides").is_dir():  # a source checkout
        return root
    return Path(__file__).resolve().parent / "_specs"


def available(folder: str) -> list[str]:
    """Names of the specs in ``specs_dir() / folder``."""
    directory = specs_dir() / folder
    return sorted(p.stem for p in directory.glob("*.toml")) if directory.is_dir() else []


def resolve(path_or_name, folder: str, kind: str) -> Path:
    """A spec file from a path or a bare name looked up in ``specs_dir() / folder``; ``kind``
    names the spec in messages (``"model"``, ``"guide"``, ``"dataset"``)."""
    text = os.fspath(path_or_name)
    path = Path(text)
    if path.is_file():
        return path
    if not path.is_absolute() and (specs_dir() / path).is_file():
        return specs_dir() / path  # e.g. "models/NAME.toml" from outside the repository root
    if path.name == text:  # a bare name: no directory part
        stem = path.stem if path.suffix == ".toml" else text
        candidate = specs_dir() / folder / f"{stem}.toml"
        if candidate.is_file():
            return candidate
        raise SpecError(f"no {kind} spec {text!r}: not a file, and not in "
                        f"{specs_dir() / folder} (available: {', '.join(available(folder))})")
    raise SpecError(f"{text}: no such file")


def display(path: Path) -> str:
    """The path as shown in messages: relative to the working directory where possible."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


_WHERE = re.compile(r"\s*\((at line \d+, column \d+|at end of document)\)$")


def read(path: Path) -> tuple[dict, str]:
    """``(table, text)`` of a TOML file; a syntax error names the line and column."""
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{display(path)}: cannot read: {err}") from None
    try:
        return tomllib.loads(source), source
    except tomllib.TOMLDecodeError as err:
        message = " ".join(str(err).split())
        match = _WHERE.search(message)
        where = f" {match.group(1)}" if match else ""
        raise SpecError(f"{display(path)}: invalid TOML{where}: "
                        f"{_WHERE.sub('', message)}") from None


def show(value) -> str:
    """A value as written in TOML (``true``, ``'relu'``, ``[1, 2]``, ``{...}``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


class Table:
    """One table of a spec file: unknown keys are refused (naming the allowed ones); typed
    getters return the value or ``default`` and fail naming file, table and key."""

    def __init__(self, file: str, section: str, data, allowed, kind="table"):
        self.file, self.section = file, section
        if not isinstance(data, dict):
            raise SpecError(f"{file}: {section}: expected a {kind}, found {show(data)}")
        self.data = data
        unknown = [k for k in data if k not in allowed]
        if unknown:
            where = f"{section} " if section else ""
            raise SpecError(f"{file}: {where}unknown key {unknown[0]!r}; "
                            f"allowed: {', '.join(sorted(allowed))}")

    def fail(self, key: str, message: str):
        where = f"{self.section} " if self.section else ""
        raise SpecError(f"{self.file}: {where}{key}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def given(self, **getters) -> dict:
        """``{key: getter(key)}`` for the keys present in the table (constructor arguments:
        absent keys take the constructor's default)."""
        return {key: get(key) for key, get in getters.items() if key in self.data}

    def get_str(self, key: str, default=None, choices=None) -> str | None:
        value = self.data.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(key, f"expected a string, found {show(value)}")
        if choices is not None and value not in choices:
            self.fail(key, f"expected one of {', '.join(map(repr, choices))}, found {value!r}")
        return value

    def get_bool(self, key: str, default: bool | None = None) -> bool | None:
        value = self.data.get(key, default)
        if value is None:
            return None
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, found {show(value)}")
        return value

    def get_number(self, key: str, default=None, minimum=0.0, strict=True,
                   maximum=None) -> float | None:
        """A finite number ``> minimum`` (``>=`` if not ``strict``), at most ``maximum``."""
        value = self.data.get(key, default)
        if value is None:
            return None
        bound = f"{'> ' if strict else '>= '}{minimum:g}"
        rule = f"a number {bound}" if maximum is None else f"a number in [{minimum:g}, {maximum:g}]"
        if not is_finite(value) or (value <= minimum if strict else value < minimum) or (
                maximum is not None and value > maximum):
            self.fail(key, f"expected {rule}, found {show(value)}")
        return float(value)

    def get_int(self, key: str, default=None, minimum: int = 1,
                maximum: int = 2**31) -> int | None:
        value = self.data.get(key, default)
        if value is None:
            return None
        if not is_int(value) or value < minimum:
            self.fail(key, f"expected an integer >= {minimum}, found {show(value)}")
        if value > maximum:
            self.fail(key, f"expected an integer <= {maximum}, found {show(value)}")
        return value

    def widths(self, key: str, default=None, allow_int: bool = False) -> tuple[int, ...] | None:
        """A list of positive integers (or one positive integer if ``allow_int``)."""
        value = self.data.get(key, default)
        if value is None:
            return None
        rule = "a positive integer or a list of them" if allow_int else \
            "a list of positive integers"
        if allow_int and isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            self.fail(key, f"expected {rule}, found {show(value)}")
        for v in value:
            if not is_int(v) or v < 1:
                self.fail(key, f"expected {rule}, found {show(v)}")
        return tuple(value)
