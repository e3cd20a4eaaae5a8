"""The ``nxdrop`` command as a user runs it: a real subprocess, every exit code."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.conftest import unavailable
from tests.fixtures.cdcs_server import CDCSServer
from tests.fixtures.plugins import env_with_path, install_plugin

RAISING_PLUGIN = """
    from nxdrop.destinations import ExportContext, ExportResult

    class Raising:
        name = "raising"
        priority = 200
        enabled = True

        def validate_config(self):
            return False, "the service is down"

        def export(self, context: ExportContext) -> ExportResult:
            raise RuntimeError("plugin bug")

    class Broken:
        def __init__(self):
            raise ImportError("missing dependency frobnicate")
"""


@pytest.fixture
def nxdrop(tmp_path: Path, drop: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m nxdrop ARGS`` with a state folder, a drop folder and an archive."""
    site = tmp_path / "site"
    install_plugin(
        site,
        "nx_raising",
        RAISING_PLUGIN,
        {"raising": "nx_raising:Raising", "broken": "nx_raising:Broken"},
    )

    def run(*args: str, plugin: bool = False, **env: str) -> subprocess.CompletedProcess[str]:
        base = (
            env_with_path(site)
            if plugin
            else {k: v for k, v in os.environ.items() if not k.startswith("NX_")}
        )
        base |= {
            "NX_DATA_PATH": str(tmp_path / "state"),
            "NX_DROP_PATH": str(drop),
            "NX_ARCHIVE_PATH": str(tmp_path / "archive"),
            "NX_RETRY_MAX_TIME": "0",
            "NX_SETTLE_SECONDS": "0.2",  # files copied in just now settle first
        }
        base |= env
        return subprocess.run(
            [sys.executable, "-m", "nxdrop", *args],
            env=base,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    return run


def test_version_and_usage_errors(nxdrop: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    assert nxdrop("--version").stdout.startswith("nxdrop ")
    assert nxdrop().returncode == 2
    assert nxdrop("frobnicate").returncode == 2
    assert nxdrop("retry").returncode == 2  # neither FILEs nor --all
    assert nxdrop("run", "--strategy", "most").returncode == 2


def test_configuration_error_names_the_variable(
    nxdrop: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    result = nxdrop("run", "--once", NX_WORKERS="many")
    assert result.returncode == 2
    assert "NX_WORKERS" in result.stderr


def test_a_schema_that_does_not_compile_stops_the_start_and_the_shipped_one_loads_no_lxml(
    nxdrop: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    # The reader is made at the first record, but an XSD of the operator's is compiled at
    # start: an empty drop folder must not hide that it is unusable.
    broken = tmp_path / "broken.xsd"
    broken.write_text("<xs:schema xmlns:xs='http://www.w3.org/2001/XMLSchema'><oops/>")
    result = nxdrop("run", "--once", NX_SCHEMA_PATH=str(broken))
    assert result.returncode == 2, result.stderr
    assert f"NX_SCHEMA_PATH={broken}: not a usable XSD" in result.stderr

    for schema in ("", "none"):  # the shipped schema, and none at all
        imports = nxdrop("run", "--once", NX_SCHEMA_PATH=schema, PYTHONPROFILEIMPORTTIME="1")
        assert imports.returncode == 0, imports.stderr
        assert "| nxdrop.daemon" in imports.stderr  # the import log is there…
        assert "lxml" not in imports.stderr  # …and lxml waits for a record to read


def test_no_destination_enabled_is_a_configuration_error(
    nxdrop: Callable[..., subprocess.CompletedProcess[str]], place: Callable[..., Path]
) -> None:
    record = place()
    for command in (["run", "--once"], ["export", str(record)]):
        result = nxdrop(*command, NX_ARCHIVE_PATH="")
        assert result.returncode == 2, result.stderr
        assert "no destination is enabled" in result.stderr
    assert record.exists()  # nothing moved


def test_export_exit_codes(
    nxdrop: Callable[..., subprocess.CompletedProcess[str]], place: Callable[..., Path], drop: Path
) -> None:
    good = place()
    assert nxdrop("export", str(good)).returncode == 0
    assert (drop / "uploaded" / good.name).exists()

    bad = drop / "bad.xml"
    bad.write_text("<Experiment>")
    result = nxdrop("export", str(place("example_record_curation.xml")), str(bad))
    assert result.returncode == 1
    assert "bad.xml: rejected" in result.stderr
    assert (drop / "failed" / "bad.xml.error.json").exists()


def test_run_once_exit_codes(
    nxdrop: Callable[..., subprocess.CompletedProcess[str]], place: Callable[..., Path], drop: Path
) -> None:
    place()
    place("example_record_curation.xml")
    result = nxdrop("run", "--once")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (drop / "uploaded").iterdir()) == [
        "example_record.xml",
        "example_record_curation.xml",
    ]
    assert nxdrop("run", "--once").returncode == 0  # nothing to do is fine

    (drop / "bad.xml").write_text("")
    assert nxdrop("run", "--once").returncode == 1


def test_raising_plugin_is_a_failed_destination_not_a_crash(
    nxdrop: Callable[..., subprocess.CompletedProcess[str]],
    place: Callable[..., Path],
    drop: Path,
) -> None:
    record = place()
    result = nxdrop("export", str(record), plugin=True)
    assert result.returncode == 1  # strategy all: the raising plugin failed
    error = json.loads((drop / "failed" / f"{record.name}.error.json").read_text())
    assert "plugin bug" in error["destinations"]["raising"]["error"]
    assert error["destinations"]["archive"]["success"] is True

    place("example_record_curation.xml")
    result = nxdrop("run", "--once", plugin=True, NX_EXPORT_STRATEGY="best_effort")
    assert result.returncode == 0
    assert (drop / "uploaded" / "example_record_curation.xml").exists()


def test_destinations_lists_priority_order_and_why_off(
    nxdrop: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    result = nxdrop("destinations", plugin=True)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    names = [line.split()[0] for line in lines]
    assert (
        names.index("raising")
        < names.index("cdcs")
        < names.index("elabftw")
        < names.index("archive")
    )
    text = {line.split()[0]: line for line in lines}
    assert "enabled" in text["archive"] and "plugin (nx_raising)" in text["raising"]
    assert "NX_CDCS_URL" in text["cdcs"]
    assert "frobnicate" in text["broken"]


def test_check_exit_codes(
    nxdrop: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    good = nxdrop("check")
    assert good.returncode == 0, good.stdout
    assert "✓ destination archive" in good.stdout

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = nxdrop("check", NX_ARCHIVE_PATH=str(blocker / "archive"))
    assert bad.returncode == 1
    assert "✗ destination archive" in bad.stdout

    plugin = nxdrop("check", plugin=True)
    assert plugin.returncode == 1
    assert "✗ destination raising (priority 200): the service is down" in plugin.stdout

    assert nxdrop("check", NX_HTTP_TIMEOUT="soon").returncode == 2


def test_status_and_retry(
    nxdrop: Callable[..., subprocess.CompletedProcess[str]], place: Callable[..., Path], drop: Path
) -> None:
    assert "nothing logged" in nxdrop("status").stdout
    place()
    nxdrop("run", "--once", plugin=True)  # fails: the raising plugin

    table = nxdrop("status")
    assert table.returncode == 0
    assert "example_record" in table.stdout and "BUILT_NOT_EXPORTED" in table.stdout
    story = json.loads(nxdrop("status", "example_record", "--json").stdout)
    assert story["session"]["status"] == "BUILT_NOT_EXPORTED"
    assert [f["where"] for f in story["files"]] == ["failed"]
    rows = story["attempts"]
    assert {r["destination_name"]: r["success"] for r in rows} == {
        "raising": False,
        "archive": True,
    }

    assert nxdrop("retry", "--all").returncode == 0
    assert (drop / "example_record.xml").exists()
    assert nxdrop("run", "--once").returncode == 0  # without the plugin now
    rows = json.loads(nxdrop("status", "example_record", "--json").stdout)["attempts"]
    # the plugin and the archive ran side by side: their rows in the order they started
    first, second = [r["state"] for r in rows[:2]], [r["state"] for r in rows[2:]]
    assert sorted(first) == ["failed", "succeeded"] and second == ["reused"]
    assert nxdrop("retry", "missing.xml").returncode == 1


def test_two_daemons_sharing_a_folder_export_each_file_once(
    nxdrop: Callable[..., subprocess.CompletedProcess[str]],
    corpus: Path,
    drop: Path,
    tmp_path: Path,
) -> None:
    content = (corpus / "example_record_curation.xml").read_bytes()
    names = [f"2024-01-15_FEI-Titan-TEM_{i:03d}.xml" for i in range(150)]
    for i, name in enumerate(names):  # distinct bytes: no reuse can hide a second export
        (drop / name).write_bytes(content + f"<!-- {i} -->".encode())
    env = {k: v for k, v in os.environ.items() if not k.startswith("NX_")}
    env |= {
        "NX_DATA_PATH": str(tmp_path / "state"),
        "NX_DROP_PATH": str(drop),
        "NX_ARCHIVE_PATH": str(tmp_path / "archive"),
        "NX_SETTLE_SECONDS": "0.2",
    }
    daemons = [
        subprocess.Popen(
            [sys.executable, "-m", "nxdrop", "run", "--once"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for daemon in daemons:
        _, err = daemon.communicate(timeout=300)
        assert daemon.returncode == 0, err

    assert sorted(p.name for p in (drop / "uploaded").iterdir()) == names
    archived = sorted(p.name for p in (tmp_path / "archive").rglob("*.xml"))
    assert archived == names  # a second export would have made <name>.1.xml
    with sqlite3.connect(tmp_path / "state" / "nxdrop.db") as db:
        rows = db.execute(
            "SELECT session_identifier, COUNT(*) FROM upload_log GROUP BY session_identifier"
        ).fetchall()
    assert sorted(rows) == [(n.removesuffix(".xml"), 1) for n in names]


def test_options_count_before_and_after_the_command(
    nxdrop: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    env_file = tmp_path / "nxdrop.env"
    env_file.write_text(f"NX_ARCHIVE_PATH={tmp_path / 'from-file'}\n")
    for args in (["--env-file", str(env_file), "check"], ["check", "--env-file", str(env_file)]):
        result = nxdrop(*args, NX_ARCHIVE_PATH="")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "✓ destination archive" in result.stdout
    assert (tmp_path / "from-file").is_dir()  # check made the archive folder it was given


# -- shell completion: `nxdrop completion bash|zsh`, generated from the parser --------------

# The commands of the contract; the parser may have more (completion itself, say).
CONTRACT_COMMANDS = {"run", "export", "check", "status", "retry", "destinations", "backfill"}


def _commands() -> set[str]:
    """Every subcommand the parser knows, so that a new one cannot be forgotten here."""
    from nxdrop.cli import _parser

    [sub] = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_bash_completion_completes_every_command_and_bash_loads_it(
    nxdrop: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    commands = _commands()
    assert CONTRACT_COMMANDS | {"completion"} <= commands
    # Needs no settings: it works while the env file is missing, as during packaging.
    made = nxdrop("completion", "bash", NX_ENV_FILE=str(tmp_path / "missing.env"))
    assert made.returncode == 0, made.stderr
    script = tmp_path / "nxdrop.bash"
    script.write_text(made.stdout)
    (tmp_path / "record.xml").touch()
    # What pressing TAB does: bash calls the function `complete -F` names with COMP_*.
    probe = f"""
        source {script} || exit 3
        complete -p nxdrop
        fn=$(complete -p nxdrop | sed -E 's/.* -F ([^ ]+) .*/\\1/')
        tab() {{
            COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; COMP_POINT=${{#COMP_LINE}}
            COMPREPLY=(); "$fn" nxdrop "${{COMP_WORDS[-1]}}" "${{COMP_WORDS[-2]}}"
            echo "${{COMPREPLY[*]}}"
        }}
        tab nxdrop ''
        tab nxdrop st
        tab nxdrop run --strategy ''
        tab nxdrop export rec
        tab nxdrop completion ''
    """
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    registered, every, status, strategies, files, shells = done.stdout.splitlines()
    assert registered.startswith("complete ") and registered.endswith(" nxdrop")
    assert set(every.split()) == commands
    assert status == "status"
    assert strategies.split() == ["all", "first_success", "best_effort"]
    assert files == "record.xml"
    assert shells.split() == ["bash", "zsh"]
    assert nxdrop("completion", "fish").returncode == 2


def test_zsh_completion_is_found_by_compinit(
    nxdrop: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    zsh = shutil.which("zsh")
    if zsh is None:
        unavailable("zsh is not installed (apt-get install zsh)")
    made = nxdrop("completion", "zsh")
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("#compdef nxdrop\n")
    for command in _commands():
        assert re.search(rf"^\s+{command}:'", made.stdout, re.M), command
    # Installed as docs/deploy.md says: a file `_nxdrop` in a folder of $fpath.
    folder = tmp_path / "site-functions"
    folder.mkdir()
    (folder / "_nxdrop").write_text(made.stdout)
    syntax = subprocess.run(
        [zsh, "-n", str(folder / "_nxdrop")], capture_output=True, text=True, check=False
    )
    assert (syntax.returncode, syntax.stderr) == (0, "")
    found = subprocess.run(
        [
            zsh,
            "-f",
            "-c",
            f"fpath=({folder} $fpath); autoload -Uz compinit && compinit -u -D; "
            "print -r -- $_comps[nxdrop]",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (found.returncode, found.stdout, found.stderr) == (0, "_nxdrop\n", "")


@pytest.mark.cdcs
def test_check_against_a_wrong_sub_path_says_404_in_one_line(
    nxdrop: Callable[..., subprocess.CompletedProcess[str]], cdcs_server: CDCSServer
) -> None:
    # The real CDCS answers a path it does not have with its whole 404 page.
    page = requests.get(f"{cdcs_server.url}wrong/rest/templates/global/", timeout=30)
    assert page.status_code == 404 and "<html" in page.text.lower()
    checked = nxdrop(
        "check", NX_CDCS_URL=f"{cdcs_server.url}wrong/", NX_CDCS_TOKEN=cdcs_server.user_token
    )
    assert checked.returncode == 1
    [line] = [x for x in checked.stdout.splitlines() if "cdcs" in x]
    assert "404" in line and "<" not in line and len(line) < 300, checked.stdout
