"""Configuration from ``NX_*`` environment variables, an env file and systemd credentials.

Built once by :func:`load_settings` and passed down; nothing reads the environment later.
A relative path (``NX_*_PATH``, ``NX_CERT_BUNDLE``, the ``*_FILE`` secrets, a SQLite
``NX_DB_URL``) is taken from the working directory nxdrop was started in, once, here.
"""

from __future__ import annotations

import os
import ssl
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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


class Strategy(StrEnum):
    """How the outcomes of several destinations make the outcome of a record."""

    ALL = "all"  # exported only if every enabled destination succeeded
    FIRST_SUCCESS = "first_success"  # stop at the first success, in priority order
    BEST_EFFORT = "best_effort"  # try every destination; exported if one succeeded


def _default_data_path() -> Path:
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        # systemd may list several directories, separated by colons; the first is ours.
        return Path(state.split(":")[0])
    return Path.home() / ".local" / "state" / "nxdrop"


class Settings(BaseSettings):
    """Every ``NX_`` setting of the contract; field ``foo`` is variable ``NX_FOO``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        env_ignore_empty=True,  # `NX_CDCS_URL=` in an env file means "not set"
    )

    data_path: Path = Field(default_factory=_default_data_path)
    drop_path: Path | None = None
    db_url: str | None = None
    export_strategy: Strategy = Strategy.ALL

    cdcs_url: str | None = None
    cdcs_token: SecretStr | None = None
    cdcs_token_file: Path | None = None
    cdcs_template: str | None = None
    cdcs_assign_to_public_workspace: bool = True
    # NexusLIMS 2.7: each record given to the CDCS user of its experimenter (change-owner);
    # needs a superuser's NX_CDCS_TOKEN.
    cdcs_user_owned_records: bool = False

    elabftw_url: str | None = None
    elabftw_api_key: SecretStr | None = None
    elabftw_api_key_file: Path | None = None
    elabftw_experiment_category: str | None = None
    elabftw_experiment_status: str | None = None
    elabftw_team: str = "current"

    archive_path: Path | None = None

    cert_bundle: Path | None = None
    disable_ssl_verify: bool = False
    # ``$NX_DATA_PATH/logs`` unless set (see _derive); ``none`` for no log file.
    log_path: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_target: Literal["auto", "journal", "stderr"] = "auto"

    workers: int = Field(default=4, ge=1, le=64)
    queue_size: int = Field(default=256, ge=1)
    observer: Literal["inotify", "polling"] = "inotify" if sys.platform == "linux" else "polling"
    settle_seconds: float = Field(default=2.0, gt=0)
    rescan_seconds: float = Field(default=60.0, gt=0)
    stop_timeout: float = Field(default=60.0, gt=0)
    # An export running, or work waiting unstarted, this long: stuck (no WATCHDOG=1).
    stuck_seconds: float = Field(default=900.0, gt=0)
    http_timeout: float = Field(default=30.0, gt=0)
    retry_max_time: float = Field(default=120.0, ge=0)
    max_record_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    # The NexusLIMS schema shipped in the package, unless another file or ``none``.
    schema_path: Path | None = NEXUS_EXPERIMENT_XSD
    # Prometheus: ``host:port`` (loopback with only a port) to serve /metrics, off unless
    # set; and a file for node_exporter's textfile collector.
    metrics_address: str | None = None
    metrics_textfile: Path | None = None

    @field_validator("schema_path", "log_path", mode="before")
    @classmethod
    def _none_is_off(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == OFF_WORD:
            return None
        return value

    @field_validator(*PATHS, mode="after")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else _absolute(value)

    @field_validator("db_url", mode="after")
    @classmethod
    def _absolute_sqlite(cls, value: str | None) -> str | None:
        return None if value is None else _absolute_sqlite_url(value)

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        if self.drop_path is None:
            self.drop_path = self.data_path / "drop"
        if self.db_url is None:
            self.db_url = f"sqlite:///{self.data_path / 'nxdrop.db'}"
        if self.log_path is None and "log_path" not in self.model_fields_set:
            # Beside the state, as NexusLIMS keeps its log; NX_LOG_PATH=none is set, to None.
            self.log_path = self.data_path / "logs"
        for name in SECRETS:
            if getattr(self, name) is None:
                setattr(self, name, _read_secret(name, getattr(self, f"{name}_file")))
        if self.cert_bundle is not None:
            _check_ca_bundle(self.cert_bundle)
        if self.schema_path is not None and not self.schema_path.is_file():
            raise ValueError(f"NX_SCHEMA_PATH={self.schema_path}: no such file")
        return self

    @property
    def drop(self) -> Path:
        """The drop folder (always set after validation)."""
        assert self.drop_path is not None
        return self.drop_path

    @property
    def database_url(self) -> str:
        """The Peewee database URL (always set after validation)."""
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
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:  # SSLError is an OSError; both say why
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise ValueError(f"NX_CERT_BUNDLE={path}: not a PEM CA bundle: {reason}") from None
    if not context.cert_store_stats().get("x509"):
        raise ValueError(f"NX_CERT_BUNDLE={path}: not a PEM CA bundle: no certificate in it")


def _read_secret(name: str, path: Path | None) -> SecretStr | None:
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
    return SecretStr(value)


def load_settings(env_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings once: flags (``overrides``) beat the environment, which beats the file.

    The env file is ``env_file``, else ``$NX_ENV_FILE``. Every problem is a
    :class:`ConfigError` whose message names the variable.
    """
    env_file = env_file or os.environ.get(f"{ENV_PREFIX}ENV_FILE") or None
    if env_file is not None and not Path(env_file).is_file():
        raise ConfigError(f"env file {env_file}: no such file")
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(_env_file=env_file, **given)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{ENV_PREFIX}{field.upper()}: {message}" if field else message)
    return "; ".join(lines)
