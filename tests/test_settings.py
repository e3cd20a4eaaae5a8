"""Settings: variables, env file, flags, secrets from files and systemd credentials, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from nxdrop.exceptions import ConfigError
from nxdrop.settings import Strategy, load_settings


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
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert load_settings().tls_verify is True
    assert load_settings(cert_bundle=bundle).tls_verify == str(bundle)
    assert load_settings(disable_ssl_verify=True).tls_verify is False
