"""Settings plumbing shared by the gateway and the worker: ``JOBGATE_*`` variables, command-line
flags, and reprs that never show a secret."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")
V = TypeVar("V")


def setting(default: V, meaning: str, *, repr: bool = True) -> V:
    """A settings field: its default and the one line that ``--help`` and the docs give as its meaning."""
    made: V = dataclasses.field(default=default, repr=repr, metadata={"help": meaning})
    return made


def meaning_of(f: dataclasses.Field[Any]) -> str:
    """The meaning a settings field was declared with (see ``setting``)."""
    return str(f.metadata.get("help", ""))


def redact(url: str) -> str:
    """The URL with any password replaced (a Sentinel URL's ``sentinel_password`` too), for logs and reprs."""
    address, mark, query = url.partition("?")
    if query:
        query = re.sub(r"(^|&)(sentinel_password=)[^&]*", r"\1\2***", query)
    if "@" in address:
        scheme, _, rest = address.partition("://")
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        address = f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"
    return address + mark + query


def read_file(name: str, path: str) -> bytes:
    """The bytes of the file a setting names (b'' when it is empty). Raises ValueError naming the setting."""
    if not path:
        return b""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {path}: {exc.strerror}") from None


# What a file looked like when last looked at: (modified ns, size), None for a missing one.
FileStamp = tuple[int, int] | None


def file_stamps(*paths: str) -> tuple[FileStamp, ...]:
    """The stamp of each file (None for an empty path or a file that cannot be read): comparing two
    tells whether files that a setting names have changed (certificate renewals)."""
    out: list[FileStamp] = []
    for path in paths:
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        out.append((st.st_mtime_ns, st.st_size) if st else None)
    return tuple(out)


def settings_repr(settings: DataclassInstance) -> str:
    """Every field, with secrets masked (the password in ``redis_url``, tokens): settings are logged
    at start-up."""
    shown = []
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name == "redis_url":
            value = redact(value)
        elif f.name in SECRETS and value:
            value = "***"
        shown.append(f"{f.name}={value!r}")
    return f"{type(settings).__name__}({', '.join(shown)})"


SECRETS = frozenset({"auth_tokens"})


def check_redis_wait(replicas: int, timeout_ms: int) -> None:
    """Raises ValueError unless ``redis_wait_replicas`` is not negative and ``redis_wait_timeout_ms`` positive."""
    if replicas < 0 or timeout_ms <= 0:
        raise ValueError("redis_wait_replicas must not be negative and redis_wait_timeout_ms must be positive")


def check_listen(name: str, value: str, *, optional: bool = False) -> None:
    """Raises ValueError unless ``value`` is ``host:port`` (or empty, when ``optional``)."""
    if optional and not value:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{name} must be host:port, got {value!r}")


def from_env_vars(cls: type[T], env: Mapping[str, str]) -> T:
    values: dict[str, Any] = {}
    for f in fields(cls):
        var = "JOBGATE_" + f.name.upper()
        if var in env:
            try:
                values[f.name] = _convert(f.default, env[var])
            except ValueError:
                raise ValueError(f"{var}: cannot read {env[var]!r} as {type(f.default).__name__}") from None
    return cls(**values)


def _convert(default: Any, raw: str) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(raw)
    return type(default)(raw)


def with_flags(settings: T, argv: Sequence[str] | None, prog: str, description: str) -> T:
    """These settings overridden by command-line flags, one per field but the secrets. ``--help``
    gives each flag's meaning, default and environment variable."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{description} Each setting is its default, overridden by its environment variable,"
        " overridden by its flag.",
        epilog=_secrets_epilog(settings),
    )
    for f in fields(settings):
        if f.name in SECRETS:
            continue  # environment only: a command line shows in `ps` and /proc/<pid>/cmdline
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        text = _escape(f"{meaning_of(f)} (default: {_shown(f.default)}; env JOBGATE_{f.name.upper()})")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=text)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return dataclasses.replace(settings, **given)


def _shown(default: object) -> str:
    return "empty" if default == "" else str(default)


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help text with %


def _secrets_epilog(settings: DataclassInstance) -> str | None:
    secret = [f for f in fields(settings) if f.name in SECRETS]
    if not secret:
        return None
    lines = [f"JOBGATE_{f.name.upper()}: {meaning_of(f)}" for f in secret]
    return _escape("Environment only (a flag would show in ps): " + "; ".join(lines))
