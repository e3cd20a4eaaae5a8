"""The README's quick start, run as a newcomer would: make a venv, install into it, run, drop.

The commands are taken from the README's quick-start block itself, so the two cannot drift.
They run in a shell where nothing of nxdrop is installed (the test's own virtualenv is off
the ``PATH``), so the block must make its virtualenv itself, as a stock Debian or Ubuntu
Python (externally managed, PEP 668) demands, and use that virtualenv's programs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

DEADLINE = 60.0


def quickstart_commands() -> list[str]:
    """The shell lines of the README block between the quick-start markers."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- quickstart -->(.*?)<!-- /quickstart -->", readme, re.S)
    assert block, "README.md has no <!-- quickstart --> block"
    lines = re.findall(r"^\$ (.+)$", block.group(1), re.M)
    assert lines, "the quick-start block has no `$ command` lines"
    return lines


def pip_settings() -> dict[str, str]:
    """pip's cache and configuration of the real home, for a test that moves ``HOME``: CI
    then downloads each package once, and a site's index mirror or proxy still applies."""
    home = Path.home()
    settings = {
        "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(home / ".cache" / "pip")),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    config_home = Path(os.environ.get("XDG_CONFIG_HOME", home / ".config"))
    user_config = config_home / "pip" / "pip.conf"
    if "PIP_CONFIG_FILE" not in os.environ and user_config.is_file():
        settings["PIP_CONFIG_FILE"] = str(user_config)
    return settings


def wait_for(condition: object, what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if callable(condition) and condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {deadline:g} s waiting for {what}")


def test_readme_quickstart_in_a_fresh_venv(tmp_path: Path) -> None:
    commands = quickstart_commands()
    [at] = [i for i, line in enumerate(commands) if re.search(r"\bnxdrop run$", line)]
    setup, run, second_terminal = commands[:at], commands[at], commands[at + 1 :]
    # A distribution's Python refuses `pip install` outside a virtualenv: the block makes
    # one first, and never runs a bare pip (or sudo pip).
    made = re.fullmatch(r"python3 -m venv (\S+)", setup[0])
    assert made, f"the quick start must make a virtualenv first: {setup[0]!r}"
    venv_dir = made.group(1)
    assert f"{venv_dir}/bin/pip install ." in setup
    assert not [line for line in commands if re.match(r"(sudo )?pip3? ", line)]
    assert run == f"NX_ARCHIVE_PATH=~/nxdrop-archive {venv_dir}/bin/nxdrop run"
    drop_cmd, status = second_terminal
    assert drop_cmd.startswith("cp examples/records/")

    home = tmp_path / "home"
    home.mkdir()
    clone = tmp_path / "clone"
    shutil.copytree(
        REPO,
        clone,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "*.egg-info",
            "build",
            "dist",
            "__pycache__",
            ".*_cache",
            "node_modules",
        ),
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("NX_", "PYTHON", "VIRTUAL_ENV"))
    }
    # A newcomer's shell: not the test's virtualenv (nxdrop is installed there).
    ours = {str(Path(sys.executable).parent), os.environ.get("VIRTUAL_ENV", "") + "/bin"}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p not in ours)
    env |= {"HOME": str(home), **pip_settings()}

    def shell(command: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", command],
            cwd=clone,
            env=env,
            text=True,
            capture_output=True,
            check=False,
            **kwargs,
        )  # type: ignore[call-overload]

    for line in setup:
        done = shell(line, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"

    daemon = subprocess.Popen(
        ["bash", "-c", run],  # bash execs a lone command, so signals reach nxdrop
        cwd=clone,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        drop = home / ".local" / "state" / "nxdrop" / "drop"
        wait_for(
            lambda: (drop / "uploaded").is_dir() or daemon.poll() is not None,
            "the daemon to make its drop folder",
        )
        assert daemon.poll() is None, daemon.communicate()[1]
        dropped = shell(drop_cmd)
        assert dropped.returncode == 0, dropped.stderr
        names = sorted(p.name for p in (clone / "examples" / "records").glob("*.xml"))
        assert len(names) >= 2
        wait_for(
            lambda: sorted(p.name for p in (drop / "uploaded").glob("*.xml")) == names,
            "both sample records in uploaded/",
        )

        shown = shell(status)
        assert shown.returncode == 0
        for name in names:
            assert re.search(rf"^{re.escape(name[:-4])}\s+COMPLETED\b", shown.stdout, re.M), (
                shown.stdout
            )
        archive = home / "nxdrop-archive"
        archived = sorted(p.name for p in archive.rglob("*.xml"))
        assert archived == names
        for name in names:
            [copy] = archive.rglob(name)
            assert copy.read_bytes() == (clone / "examples" / "records" / name).read_bytes()
        # Where the README says the log lines also are.
        log = (home / ".local" / "state" / "nxdrop" / "logs" / "nxdrop.log").read_text("utf-8")
        for name in names:
            assert f"{name} exported" in log
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            daemon.kill()
            raise
    assert code == 0, daemon.communicate()[1][-2000:]
