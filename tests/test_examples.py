"""The shipped examples: the webhook plugin package installs with pip and works; env files parse."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from nxdrop.settings import load_settings
from tests.conftest import REPO
from tests.fixtures.plugins import Webhook, env_with_path


def test_webhook_plugin_installs_and_receives_records(
    webhook_site: Path,
    webhook: Webhook,
    place: Callable[..., Path],
    drop: Path,
    tmp_path: Path,
) -> None:
    env = env_with_path(
        webhook_site,
        NX_DATA_PATH=str(tmp_path / "state"),
        NX_DROP_PATH=str(drop),
        NX_ARCHIVE_PATH=str(tmp_path / "archive"),
        NX_WEBHOOK_URL=webhook.url,
        NX_RETRY_MAX_TIME="30",
    )

    listed = subprocess.run(
        [sys.executable, "-m", "nxdrop", "destinations"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert any(
        line.split()[:2] == ["webhook", "40"]
        and "plugin (nxdrop-webhook)" in line
        and "enabled" in line
        for line in listed.stdout.splitlines()
    ), listed.stdout

    record = place(name="2018-11-13_FEI-Titan-TEM_204.xml")
    result = subprocess.run(
        [sys.executable, "-m", "nxdrop", "export", str(record)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert webhook.posts == [
        {
            "session_identifier": "2018-11-13_FEI-Titan-TEM_204",
            "instrument": "FEI-Titan-TEM",
            "user": "Ned Land (ned)",
            "start": "2018-11-13T10:00:00-07:00",
            "end": "2018-11-13T15:00:00-07:00",
            "cdcs_url": None,  # CDCS is not configured here; tests/test_end_to_end.py links it
        }
    ]
    assert (drop / "uploaded" / record.name).exists()


@pytest.mark.parametrize("name", ["nxdrop.env", "quickstart.env"])
def test_example_env_files_are_valid(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(REPO / "examples" / name)
    assert settings.archive_path is not None
    assert os.fspath(settings.drop)
