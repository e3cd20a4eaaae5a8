"""Settings: variables, env file, flags, secrets from files and systemd credentials, errors."""

from __future__ import annotations

import dataclasses
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any, get_type_hints

import certifi
import pytest
from pydantic import Field, ValidationError, create_model
from pydantic_settings import BaseSettings, SettingsConfigDict

from nxdrop.exceptions import ConfigError
from nxdrop.schemas import NEXUS_EXPERIMENT_XSD
from nxdrop.settings import PATHS, SECRETS, Settings, Strategy, load_settings

REPO = Path(__file__).resolve().parent.parent


def test_defaults_follow_the_state_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    s = load_settings()
    assert s.data_path == tmp_path / "state"
    assert s.drop == tmp_path / "state" / "drop"
    assert s.database_url == f"sqlite:///{tmp_path / 'state' / 'nxdrop.db'}"
    assert s.export_strategy is Strategy.ALL
    assert s.cdcs_token is None and s.cdcs_assign_to_public_workspace is True


def test_without_systemd_state_lives_in_the_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_settings().data_path == tmp_path / ".local" / "state" / "nxdrop"


def test_flag_beats_environment_beats_env_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_file = tmp_path / "nxdrop.env"
    env_file.write_text("NX_EXPORT_STRATEGY=best_effort\nNX_WORKERS=3\nNX_HTTP_TIMEOUT=7\n")
    from_file = load_settings(env_file)
    assert (from_file.export_strategy, from_file.workers, from_file.http_timeout) == (
        Strategy.BEST_EFFORT,
        3,
        7,
    )

    monkeypatch.setenv("NX_WORKERS", "5")
    assert load_settings(env_file).workers == 5
    assert load_settings(env_file, workers=9).workers == 9

    monkeypatch.setenv("NX_ENV_FILE", str(env_file))
    assert load_settings().export_strategy is Strategy.BEST_EFFORT


def test_secret_from_file_and_from_systemd_credentials(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("file-token\n")
    monkeypatch.setenv("NX_CDCS_TOKEN_FILE", str(token))
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "nx_elabftw_api_key").write_text("cred-key")
    (creds / "nx_cdcs_token").write_text("cred-token")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))

    s = load_settings()
    assert s.cdcs_token is not None and s.cdcs_token.get_secret_value() == "file-token"
    assert s.elabftw_api_key is not None
    assert s.elabftw_api_key.get_secret_value() == "cred-key"
    # A secret never shows in the settings' text.
    assert "file-token" not in repr(s) and "cred-key" not in str(s)

    monkeypatch.setenv("NX_CDCS_TOKEN", "env-token")
    assert load_settings().cdcs_token.get_secret_value() == "env-token"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("NX_EXPORT_STRATEGY", "most", "NX_EXPORT_STRATEGY"),
        ("NX_WORKERS", "many", "NX_WORKERS"),
        ("NX_HTTP_TIMEOUT", "-1", "NX_HTTP_TIMEOUT"),
        ("NX_OBSERVER", "fanotify", "NX_OBSERVER"),
        ("NX_CDCS_ASSIGN_TO_PUBLIC_WORKSPACE", "perhaps", "NX_CDCS_ASSIGN_TO_PUBLIC_WORKSPACE"),
        ("NX_CDCS_TOKEN_FILE", "/nonexistent/token", "NX_CDCS_TOKEN_FILE"),
        ("NX_SCHEMA_PATH", "/nonexistent.xsd", "NX_SCHEMA_PATH"),
        ("NX_CERT_BUNDLE", "/nonexistent.pem", "NX_CERT_BUNDLE"),
    ],
)
def test_errors_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=named):
        load_settings()


def test_empty_secret_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv("NX_ELABFTW_API_KEY_FILE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"NX_ELABFTW_API_KEY_FILE=.*empty"):
        load_settings()


def test_missing_env_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "missing.env")


def test_tls_settings(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    shutil.copyfile(certifi.where(), bundle)
    assert load_settings().tls_verify is True
    assert load_settings(cert_bundle=bundle).tls_verify == str(bundle)
    assert load_settings(disable_ssl_verify=True).tls_verify is False


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "no such file"),
        (b"", "not a PEM CA bundle"),
        (b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n", "PEM"),
        (b"just some text, not a certificate\n", "not a PEM CA bundle"),
        (b"\x30\x82\x01\x0a\x02\x82\x01\x01\x00", "not a PEM CA bundle"),  # DER bytes
    ],
    ids=["missing", "empty", "broken-pem", "text", "der"],
)
def test_a_bad_cert_bundle_is_a_configuration_error_at_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: bytes | None, why: str
) -> None:
    bundle = tmp_path / "ca.pem"
    if content is not None:
        bundle.write_bytes(content)
    monkeypatch.setenv("NX_CERT_BUNDLE", str(bundle))

    with pytest.raises(ConfigError, match=rf"NX_CERT_BUNDLE={bundle}: .*{why}"):
        load_settings()


def test_a_cert_bundle_is_what_tls_loads(tmp_path: Path) -> None:
    one_ca = tmp_path / "one.pem"
    first = certifi.contents().split("-----END CERTIFICATE-----")[0]
    one_ca.write_text(first + "-----END CERTIFICATE-----\n")
    settings = load_settings(cert_bundle=one_ca)
    context = ssl.create_default_context(cafile=str(settings.tls_verify))
    assert context.cert_store_stats()["x509"] == 1


def test_relative_paths_are_taken_from_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    shutil.copyfile(certifi.where(), tmp_path / "conf" / "ca.pem")
    shutil.copyfile(NEXUS_EXPERIMENT_XSD, tmp_path / "conf" / "my.xsd")
    (tmp_path / "conf" / "token").write_text("t0ken")
    (tmp_path / "conf" / "key").write_text("k3y")
    for variable, value in {
        "NX_DATA_PATH": "nxdrop-state",
        "NX_ARCHIVE_PATH": "./archive",
        "NX_LOG_PATH": "logs",
        "NX_SCHEMA_PATH": "conf/my.xsd",
        "NX_CERT_BUNDLE": "conf/ca.pem",
        "NX_CDCS_TOKEN_FILE": "conf/token",
        "NX_ELABFTW_API_KEY_FILE": "conf/key",
    }.items():
        monkeypatch.setenv(variable, value)

    s = load_settings(drop_path="incoming")
    monkeypatch.chdir("/")  # what happens later (a daemon, a chdir) changes nothing

    assert s.data_path == tmp_path / "nxdrop-state"
    assert s.drop == tmp_path / "incoming"
    assert s.database_url == f"sqlite:///{tmp_path / 'nxdrop-state' / 'nxdrop.db'}"
    assert s.archive_path == tmp_path / "archive"
    assert s.log_path == tmp_path / "logs"
    assert s.schema_path == tmp_path / "conf" / "my.xsd"
    assert s.tls_verify == str(tmp_path / "conf" / "ca.pem")
    assert s.cdcs_token is not None and s.cdcs_token.get_secret_value() == "t0ken"
    assert s.elabftw_api_key is not None and s.elabftw_api_key.get_secret_value() == "k3y"


def test_a_relative_home_path_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NX_ARCHIVE_PATH", "~/nxdrop-archive")
    assert load_settings().archive_path == tmp_path / "nxdrop-archive"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///state/nx.db", "sqlite:///{cwd}/state/nx.db"),
        ("sqlite:///nx.db?timeout=5", "sqlite:///{cwd}/nx.db?timeout=5"),
        ("sqliteext:///nx.db", "sqliteext:///{cwd}/nx.db"),
        ("sqlite:////var/lib/nxdrop/nx.db", "sqlite:////var/lib/nxdrop/nx.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("postgresql://nx@db.example/nx", "postgresql://nx@db.example/nx"),
    ],
)
def test_a_relative_sqlite_database_is_taken_from_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NX_DB_URL", url)
    assert load_settings().database_url == expected.format(cwd=tmp_path)


def test_the_quickstart_env_file_keeps_its_state_where_it_is_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(REPO / "examples" / "quickstart.env")
    monkeypatch.chdir("/")

    assert settings.data_path == tmp_path / "nxdrop-state"
    assert settings.drop == tmp_path / "nxdrop-state" / "drop"
    assert settings.archive_path == tmp_path / "nxdrop-archive"
    assert settings.database_url == f"sqlite:///{tmp_path / 'nxdrop-state' / 'nxdrop.db'}"


def test_the_nexuslims_schema_is_checked_unless_switched_off(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    default = load_settings().schema_path
    assert default == NEXUS_EXPERIMENT_XSD and default.is_file()
    monkeypatch.setenv("NX_SCHEMA_PATH", "")  # empty means "not set": the default
    assert load_settings().schema_path == NEXUS_EXPERIMENT_XSD
    for off in ("none", "None", "NONE"):
        monkeypatch.setenv("NX_SCHEMA_PATH", off)
        assert load_settings().schema_path is None
    other = tmp_path / "other.xsd"
    shutil.copyfile(NEXUS_EXPERIMENT_XSD, other)
    monkeypatch.setenv("NX_SCHEMA_PATH", str(other))
    assert load_settings().schema_path == other
    monkeypatch.setenv("NX_LOG_PATH", "none")
    assert load_settings().log_path is None


def test_a_bad_cert_bundle_stops_the_command_with_exit_2(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NX_")}
    env |= {
        "NX_DATA_PATH": str(tmp_path / "state"),
        "NX_ARCHIVE_PATH": str(tmp_path / "archive"),
        "NX_CERT_BUNDLE": str(junk),
    }
    for command in (["check"], ["run", "--once"]):
        result = subprocess.run(
            [sys.executable, "-m", "nxdrop", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert f"NX_CERT_BUNDLE={junk}: not a PEM CA bundle" in result.stderr
        assert "Traceback" not in result.stderr


# pydantic-settings, which nxdrop's settings follow (nxdrop.settings): a model of the same
# fields, the same limits and the same rules, given the same variables, must agree with
# nxdrop on every value and every error. Paths and secrets are nxdrop's own (relative paths,
# `none`, secret files), tested above.
class _PydanticBase(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NX_", extra="ignore", env_ignore_empty=True)


def _pydantic_twin() -> type[BaseSettings]:
    hints = get_type_hints(Settings)
    definitions: dict[str, Any] = {
        field.name: (hints[field.name], Field(field.default, **field.metadata.get("bounds", {})))
        for field in dataclasses.fields(Settings)
        if field.name not in {*PATHS, *SECRETS, "db_url"}
    }
    return create_model("PydanticTwin", __base__=_PydanticBase, **definitions)


PYDANTIC_TWIN = _pydantic_twin()


def _by_nxdrop(env_file: Path | None = None) -> dict[str, Any] | str:
    try:
        settings = load_settings(env_file)
    except ConfigError as exc:
        return str(exc)
    return {name: getattr(settings, name) for name in PYDANTIC_TWIN.model_fields}


def _by_pydantic(env_file: Path | None = None) -> dict[str, Any] | str:
    try:
        return PYDANTIC_TWIN(_env_file=env_file).model_dump()  # type: ignore[call-arg]
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        return "; ".join(sorted(f"NX_{str(e['loc'][0]).upper()}: {e['msg']}" for e in errors))


@pytest.mark.parametrize(
    ("variable", "values"),
    [
        (
            "NX_WORKERS",
            ["3", " 3 ", "+3", "3.0", "3.00", "3.", "1_0", "3.5", "0x10", "1e1", "٣", "0", "65"],
        ),
        ("NX_QUEUE_SIZE", ["1", "-1", "many"]),
        ("NX_HTTP_TIMEOUT", ["7", " 2.5 ", ".5", "1e1", "1_0.5", "inf", "nan", "0", "-1", "0x1"]),
        ("NX_RETRY_MAX_TIME", ["0", "-0.5", "Infinity"]),
        ("nx_settle_seconds", ["0.1"]),
        ("NX_CDCS_ASSIGN_TO_PUBLIC_WORKSPACE", ["true", "FALSE", "On", "off", "1", "0", "y"]),
        ("NX_DISABLE_SSL_VERIFY", ["t", "N", " yes", "2", "perhaps", "tRuE"]),
        ("NX_EXPORT_STRATEGY", ["all", "first_success", "best_effort", "ALL", " all", "most"]),
        ("NX_OBSERVER", ["inotify", "polling", "fanotify"]),
        ("NX_LOG_LEVEL", ["DEBUG", "debug", "ERROR"]),
        ("Nx_Log_Target", ["journal", "stderr", "syslog"]),
        ("NX_ELABFTW_TEAM", ["3", " spaced ", "Ä team"]),
        ("NX_CDCS_URL", ["https://cdcs.example/", ""]),
    ],
)
def test_values_and_errors_are_those_of_pydantic_settings(
    monkeypatch: pytest.MonkeyPatch, variable: str, values: list[str]
) -> None:
    for value in values:
        monkeypatch.setenv(variable, value)
        assert _by_nxdrop() == _by_pydantic(), f"{variable}={value!r}"


def test_an_env_file_is_read_as_pydantic_settings_reads_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NX_WORKERS", "5")  # the environment beats the file
    monkeypatch.setenv("ELAB_TEAM", "7")
    env_file = tmp_path / "nexuslims.env"
    env_file.write_text(
        "# a NexusLIMS .env\n"
        "NX_WORKERS=2\n"
        "export NX_LOG_LEVEL=DEBUG\n"
        "nx_http_timeout = 12.5  # seconds\n"
        "NX_CDCS_URL='https://cdcs.example/cdcs/'\n"
        'NX_CDCS_TEMPLATE="Nexus # template"\n'
        "NX_ELABFTW_TEAM=${ELAB_TEAM}\n"
        "NX_ELABFTW_EXPERIMENT_STATUS=\n"
        "NX_EXPORT_STRATEGY\n"
        "NX_UNKNOWN_SETTING=ignored\n"
        "OTHER=1\n"
    )
    by_nxdrop = _by_nxdrop(env_file)
    assert by_nxdrop == _by_pydantic(env_file)
    assert isinstance(by_nxdrop, dict)
    assert (by_nxdrop["workers"], by_nxdrop["http_timeout"], by_nxdrop["elabftw_team"]) == (
        5,
        12.5,
        "7",
    )
    assert by_nxdrop["cdcs_template"] == "Nexus # template"
