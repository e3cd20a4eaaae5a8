"""systemd/nxdrop.service: what the contract promises, checked with systemd's own tools."""

from __future__ import annotations

import dataclasses
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import unavailable

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "nxdrop.service"
MAX_EXPOSURE = 2.0
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def _systemd_analyze() -> str:
    """The path of systemd-analyze; a skip without it, but a failure in CI (CI=true)."""
    found = shutil.which("systemd-analyze")
    if found is None:
        unavailable("systemd-analyze is not installed (apt-get install systemd)")
    return found


def _directives(section: str) -> dict[str, list[str]]:
    """``Key=value`` lines of one section of the unit, every value of a repeated key."""
    values: dict[str, list[str]] = {}
    current = None
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_hardening_scores_at_most_2() -> None:
    done = subprocess.run(
        [_systemd_analyze(), "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "ignoring" not in done.stderr, f"systemd does not understand a line:\n{done.stderr}"
    last = done.stdout.strip().splitlines()[-1]
    match = re.search(r"Overall exposure level for nxdrop\.service: (\d+\.\d+)", last)
    assert match, f"no overall score in {last!r}"
    assert float(match.group(1)) <= MAX_EXPOSURE, done.stdout


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    # verify insists that ExecStart= exists and that the units it pulls in are there, so it
    # runs against a small root: the unit, a stand-in program and the host's system units.
    analyze = _systemd_analyze()
    if not (SYSTEM_UNITS / "sysinit.target").is_file():
        pytest.skip(f"no system units in {SYSTEM_UNITS} to verify against")
    program = tmp_path / "usr/local/bin/nxdrop"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n", encoding="utf-8")
    program.chmod(stat.S_IRWXU)
    shutil.copytree(SYSTEM_UNITS, tmp_path / "usr/lib/systemd/system", symlinks=True)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, tmp_path / "etc/systemd/system/nxdrop.service")
    done = subprocess.run(
        [analyze, "verify", f"--root={tmp_path}", "nxdrop.service"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr


def test_unit_is_a_notify_service_with_a_watchdog_and_restarts() -> None:
    service = _directives("Service")
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["Restart"] == ["on-failure"]
    assert service["WatchdogSec"][0].rstrip("s").isdigit()
    assert service["ExecStart"] == ["/usr/local/bin/nxdrop run"]
    # A configuration error (exit code 2) is not retried every few seconds.
    assert service["RestartPreventExitStatus"] == ["2"]


def test_secrets_come_from_credentials() -> None:
    credentials = _directives("Service")["LoadCredential"]
    assert "nx_cdcs_token:/etc/nxdrop/credentials/nx_cdcs_token" in credentials
    assert "nx_elabftw_api_key:/etc/nxdrop/credentials/nx_elabftw_api_key" in credentials


def test_stop_timeout_outlasts_the_daemons_own() -> None:
    # NX_STOP_TIMEOUT (60) plus one last HTTP call (NX_HTTP_TIMEOUT 30 + 5), by default.
    from nxdrop.settings import Settings

    defaults = {field.name: field.default for field in dataclasses.fields(Settings)}
    needed = defaults["stop_timeout"] + defaults["http_timeout"] + 5
    stop = _directives("Service")["TimeoutStopSec"][0]
    assert float(stop.rstrip("s")) > needed
