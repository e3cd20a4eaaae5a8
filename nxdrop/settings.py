"""Configuration from ``NX_*`` environment variables, an env file and systemd credentials.

Built once by :func:`load_settings` and passed down; nothing reads the environment later.
A relative path (``NX_*_PATH``, ``NX_CERT_BUNDLE``, the ``*_FILE`` secrets, a SQLite
``NX_DB_URL``) is taken from the working directory nxdrop was started in, once, here.

The variables follow pydantic-settings' rules, as NexusLIMS reads them (names in any case,
the environment beats the env file, an empty value is "not set", pydantic's conversions and
words): :mod:`nxdrop.envvars` does that without pydantic, whose import alone took longer
than the whole start-up of ``nxdrop run --once`` may (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, get_type_hints
from urllib.parse import unquote, urlsplit

from nxdrop.envvars import check_bounds, convert, read_env_file, variables, without_none
from nxdrop.exceptions import ConfigError
from nxdrop.schemas import NEXUS_EXPERIMENT_XSD

ENV_PREFIX = "NX_"

# Secret fields, and the name of their systemd credential ($CREDENTIALS_DIRECTORY/<name>).
SECRETS = ("cdcs_token", "elabftw_api_key")

# Settings that name a file or folder: a relative one is resolved against the working
# directory when the settings are loaded (systemd's is ``/``, a shell's wherever it is).
PATHS = (
    "data_path",
    "drop_path",
    "archive_path",
    "log_path",
    "schema_path",
    "cert_bundle",
    "metrics_textfile",
    "cdcs_token_file",
    "elabftw_api_key_file",
)
# Settings where the word ``none`` (any case) switches the thing off.
OFF_WORD = "none"
OFF_SETTINGS = ("schema_path", "log_path")


class Strategy(StrEnum):
    """How the outcomes of several destinations make the outcome of a record."""

    ALL = "all"  # exported only if every enabled destination succeeded
    FIRST_SUCCESS = "first_success"  # stop at the first success, in priority order
    BEST_EFFORT = "best_effort"  # try every destination; exported if one succeeded


class Secret:
    """A secret value that never shows in ``repr`` or ``str`` (pydantic's ``SecretStr``
    interface, which plugins written for NexusLIMS call)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        """The secret in clear: only for the request that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********" if self._value else ""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _default_data_path() -> Path:
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        # systemd may list several directories, separated by colons; the first is ours.
        return Path(state.split(":")[0])
    return Path.home() / ".local" / "state" / "nxdrop"


def _bounds(**limits: float) -> Any:
    """A field's limits (``ge``, ``gt``, ``le``), checked as pydantic's ``Field`` does."""
    return {"bounds": limits}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every ``NX_`` setting of the contract; field ``foo`` is variable ``NX_FOO``."""

    data_path: Path = field(default_factory=_default_data_path)
    drop_path: Path | None = None
    db_url: str | None = None
    export_strategy: Strategy = Strategy.ALL

    cdcs_url: str | None = None
    cdcs_token: Secret | None = None
    cdcs_token_file: Path | None = None
    cdcs_template: str | None = None
    cdcs_assign_to_public_workspace: bool = True
    # NexusLIMS 2.7: each record given to the CDCS user of its experimenter (change-owner);
    # needs a superuser's NX_CDCS_TOKEN.
    cdcs_user_owned_records: bool = False

    elabftw_url: str | None = None
    elabftw_api_key: Secret | None = None
    elabftw_api_key_file: Path | None = None
    elabftw_experiment_category: str | None = None
    elabftw_experiment_status: str | None = None
    elabftw_team: str = "current"

    archive_path: Path | None = None

    cert_bundle: Path | None = None
    disable_ssl_verify: bool = False
    # ``$NX_DATA_PATH/logs`` unless set; ``none`` for no log file.
    log_path: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_target: Literal["auto", "journal", "stderr"] = "auto"

    workers: int = field(default=4, metadata=_bounds(ge=1, le=64))
    queue_size: int = field(default=256, metadata=_bounds(ge=1))
    observer: Literal["inotify", "polling"] = "inotify" if sys.platform == "linux" else "polling"
    settle_seconds: float = field(default=2.0, metadata=_bounds(gt=0))
    rescan_seconds: float = field(default=60.0, metadata=_bounds(gt=0))
    stop_timeout: float = field(default=60.0, metadata=_bounds(gt=0))
    # An export running, or work waiting unstarted, this long: stuck (no WATCHDOG=1).
    stuck_seconds: float = field(default=900.0, metadata=_bounds(gt=0))
    http_timeout: float = field(default=30.0, metadata=_bounds(gt=0))
    retry_max_time: float = field(default=120.0, metadata=_bounds(ge=0))
    max_record_bytes: int = field(default=50 * 1024 * 1024, metadata=_bounds(gt=0))
    # The NexusLIMS schema shipped in the package, unless another file or ``none``.
    schema_path: Path | None = NEXUS_EXPERIMENT_XSD
    # Prometheus: ``host:port`` (loopback with only a port) to serve /metrics, off unless
    # set; and a file for node_exporter's textfile collector.
    metrics_address: str | None = None
    metrics_textfile: Path | None = None

    @property
    def drop(self) -> Path:
        """The drop folder (always set by :func:`load_settings`)."""
        assert self.drop_path is not None
        return self.drop_path

    @property
    def database_url(self) -> str:
        """The Peewee database URL (always set by :func:`load_settings`)."""
        assert self.db_url is not None
        return self.db_url

    def secret_values(self) -> list[str]:
        """Every secret that is set, in clear: what must never be written anywhere (the
        tokens, and a password in ``NX_DB_URL``)."""
        values = (getattr(self, name) for name in SECRETS)
        secrets = [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]
        password = urlsplit(self.database_url).password
        return [*secrets, unquote(password)] if password else secrets

    @property
    def tls_verify(self) -> bool | str:
        """What ``requests`` takes as ``verify=``."""
        if self.disable_ssl_verify:
            return False
        return str(self.cert_bundle) if self.cert_bundle else True


def _absolute(path: Path) -> Path:
    """``path`` with ``~`` expanded and, if relative, under the working directory."""
    try:
        path = path.expanduser()
    except RuntimeError as exc:  # no home directory to expand ``~`` to
        raise ValueError(f"{path}: {exc}") from None
    if path.is_absolute():
        return path
    try:
        # Not resolve(): a symbolic link in the path stays the operator's choice.
        return Path.cwd() / path
    except OSError as exc:  # the working directory was removed
        raise ValueError(f"{path}: relative, and no working directory: {exc.strerror}") from None


def _absolute_sqlite_url(url: str) -> str:
    """A SQLite URL with a relative file (``sqlite:///nxdrop.db``) made absolute."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.startswith("sqlite") or not rest.startswith("/"):
        return url  # not SQLite, or not a local file
    # Peewee takes the file as it is written after the third slash (no %-decoding).
    database, query, params = rest[1:].partition("?")
    if not database or database == ":memory:" or database.startswith("/"):
        return url
    return f"{scheme}:///{_absolute(Path(database))}{query}{params}"


def _check_ca_bundle(path: Path) -> None:
    """Load ``NX_CERT_BUNDLE`` as TLS will: a bad bundle is a configuration error at start,
    not a failure of every request later."""
    if not path.is_file():
        raise ValueError(f"NX_CERT_BUNDLE={path}: no such file")
    import ssl  # only where a bundle is set: not every start pays for it

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:  # SSLError is an OSError; both say why
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise ValueError(f"NX_CERT_BUNDLE={path}: not a PEM CA bundle: {reason}") from None
    if not context.cert_store_stats().get("x509"):
        raise ValueError(f"NX_CERT_BUNDLE={path}: not a PEM CA bundle: no certificate in it")


def _read_secret(name: str, path: Path | None) -> Secret | None:
    """A secret from ``NX_<NAME>_FILE``, else from systemd's ``LoadCredential=``."""
    variable = f"{ENV_PREFIX}{name.upper()}_FILE"
    if path is None:
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if not creds or not (Path(creds) / f"nx_{name}").is_file():
            return None
        path, variable = Path(creds) / f"nx_{name}", f"$CREDENTIALS_DIRECTORY/nx_{name}"
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"{variable}={path}: cannot read the secret: {exc.strerror}") from None
    if not value:
        raise ValueError(f"{variable}={path}: the file is empty")
    return Secret(value)


def load_settings(env_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings once: flags (``overrides``) beat the environment, which beats the file.

    The env file is ``env_file``, else ``$NX_ENV_FILE``. Every problem is a
    :class:`ConfigError` whose message names the variable.
    """
    env_file = env_file or os.environ.get(f"{ENV_PREFIX}ENV_FILE") or None
    known = {f.name: f for f in fields(Settings)}
    unknown = overrides.keys() - known.keys()
    if unknown:
        raise TypeError(f"load_settings: no setting named {', '.join(sorted(unknown))}")
    given: dict[str, Any] = {}
    if env_file is not None:
        given |= variables(read_env_file(Path(env_file)), ENV_PREFIX)
    given |= variables(os.environ, ENV_PREFIX)
    given |= {name: value for name, value in overrides.items() if value is not None}

    hints = get_type_hints(Settings)
    values: dict[str, Any] = {}
    errors = []
    for name in known.keys() & given.keys():
        try:
            values[name] = _value(name, hints[name], given[name], known[name].metadata)
        except ValueError as exc:
            errors.append(f"{ENV_PREFIX}{name.upper()}: {exc}")
    if errors:
        raise ConfigError("; ".join(sorted(errors)))
    try:
        return Settings(**_derive(values))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _value(name: str, hint: Any, given: Any, metadata: Mapping[str, Any]) -> Any:
    """One field's value from what was given (text, or a flag's typed value)."""
    if name in OFF_SETTINGS and isinstance(given, str) and given.strip().lower() == OFF_WORD:
        return None
    value = convert(without_none(hint), given)
    check_bounds(value, metadata.get("bounds", {}))
    if name in PATHS:
        return _absolute(value)
    if name == "db_url":
        return _absolute_sqlite_url(value)
    return value


def _derive(values: dict[str, Any]) -> dict[str, Any]:
    """The settings that follow from others, and the checks of files named."""
    data_path = values.setdefault("data_path", _absolute(_default_data_path()))
    values.setdefault("drop_path", data_path / "drop")
    values.setdefault("db_url", f"sqlite:///{data_path / 'nxdrop.db'}")
    # Beside the state, as NexusLIMS keeps its log; NX_LOG_PATH=none is set, to None.
    values.setdefault("log_path", data_path / "logs")
    for name in SECRETS:
        if values.get(name) is None:
            values[name] = _read_secret(name, values.get(f"{name}_file"))
    if values.get("cert_bundle") is not None:
        _check_ca_bundle(values["cert_bundle"])
    schema = values.get("schema_path", NEXUS_EXPERIMENT_XSD)
    if schema is not None and not schema.is_file():
        raise ValueError(f"NX_SCHEMA_PATH={schema}: no such file")
    return values
