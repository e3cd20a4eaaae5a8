"""The README's quick start, run as a newcomer would: a fresh venv, `pip install .`, run, drop.

The commands are taken from the README's quick-start block itself, so the two cannot drift.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import venv
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


def wait_for(condition: object, what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if callable(condition) and condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {deadline:g} s waiting for {what}")


def test_readme_quickstart_in_a_fresh_venv(tmp_path: Path) -> None:
    install, run, drop_cmd, status = quickstart_commands()
    assert install == "pip install ."
    assert run == "NX_ARCHIVE_PATH=~/nxdrop-archive nxdrop run"
    home = tmp_path / "home"
    home.mkdir()
    clone = tmp_path / "clone"
    shutil.copytree(
        REPO,
        clone,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "*.egg-info", "build", "__pycache__", ".*_cache", "node_modules"
        ),
    )
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NX_", "PYTHON"))}
    env |= {
        "HOME": str(home),
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
        "VIRTUAL_ENV": str(tmp_path / "venv"),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }

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

    installed = shell(install + " -q", timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]

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
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            daemon.kill()
            raise
    assert code == 0, daemon.communicate()[1][-2000:]
