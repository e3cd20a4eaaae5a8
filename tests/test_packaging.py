"""The distribution as a packager and an operator get it: ``python -m build``, then the wheel
installed into a fresh virtualenv (docs/deploy.md, step 3).

Built from a copy of the working tree, so the test neither depends on nor litters the
checkout (``build`` writes ``*.egg-info`` next to the sources). pip's cache and
configuration are the machine's (:func:`~tests.test_quickstart.pip_settings`), so CI
downloads setuptools and the dependencies once, not on every push.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, unavailable
from tests.test_quickstart import pip_settings

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
VERSION: str = PYPROJECT["project"]["version"]
# Leftovers a developer's tree may hold that are never part of the source.
NOT_SOURCE = {".git", ".venv", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache"}


@dataclass
class Built:
    """The two files ``python -m build`` made."""

    sdist: Path
    wheel: Path

    def sdist_names(self) -> list[str]:
        """The sdist's members without the leading ``nxdrop-<version>/``."""
        with tarfile.open(self.sdist) as tar:
            return [name.partition("/")[2] for name in tar.getnames()]

    def sdist_text(self, name: str) -> str:
        with tarfile.open(self.sdist) as tar:
            member = tar.extractfile(f"nxdrop-{VERSION}/{name}")
            assert member is not None, name
            return member.read().decode("utf-8")


def _env(home: Path) -> dict[str, str]:
    """An environment without this test run's nxdrop: no NX_*, no PYTHONPATH, no venv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("NX_", "PYTHON", "VIRTUAL_ENV")) and k != "JOURNAL_STREAM"
    }
    return env | {"HOME": str(home), **pip_settings()}


def _copy_tree(target: Path) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == REPO
        return {n for n in names if n in NOT_SOURCE or (top and n in ("build", "dist"))}

    shutil.copytree(REPO, target, ignore=ignore)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """``python -m build`` (the sdist, then the wheel built from the sdist) of the tree."""
    try:
        import build  # noqa: F401 - only whether the frontend is there
    except ImportError:
        unavailable("the `build` package is missing: pip install -e '.[dev]'")
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    _copy_tree(source)
    # What building the example plugin in place leaves behind must not reach the sdist.
    leftover = source / "examples" / "nxdrop-webhook"
    (leftover / "build" / "lib").mkdir(parents=True, exist_ok=True)
    (leftover / "build" / "lib" / "nxdrop_webhook.py").write_text("# a build copy\n")
    (leftover / "nxdrop_webhook.egg-info").mkdir(exist_ok=True)
    (leftover / "nxdrop_webhook.egg-info" / "PKG-INFO").write_text("Name: nxdrop-webhook\n")
    home = root / "home"
    home.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(root / "dist"), str(source)],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [sdist] = (root / "dist").glob("*.tar.gz")
    [wheel] = (root / "dist").glob("*.whl")
    assert sdist.name == f"nxdrop-{VERSION}.tar.gz"
    assert wheel.name == f"nxdrop-{VERSION}-py3-none-any.whl"
    return Built(sdist, wheel)


def test_the_sdist_carries_the_unit_the_examples_the_docs_and_the_license(built: Built) -> None:
    names = set(built.sdist_names())
    for needed in (
        "systemd/nxdrop.service",
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "docs/deploy.md",
        "examples/nxdrop.env",
        "examples/quickstart.env",
        "examples/nxdrop-webhook/pyproject.toml",
        "nxdrop/schemas/nexus-experiment.xsd",
        "tests/conftest.py",
    ):
        assert needed in names, f"{needed} is not in {built.sdist.name}"
    tracked = {p.relative_to(REPO).as_posix() for p in (REPO / "examples").rglob("*.xml")}
    assert tracked and tracked <= names  # the sample records of the quick start
    unit = (REPO / "systemd" / "nxdrop.service").read_text(encoding="utf-8")
    assert built.sdist_text("systemd/nxdrop.service") == unit
    leftovers = [n for n in names if re.search(r"(^|/)build/|\.egg-info/|\.pyc$", n)]
    assert [n for n in leftovers if not n.startswith("nxdrop.egg-info/")] == []


def test_the_license_is_spdx_metadata_and_a_file_in_both(built: Built) -> None:
    license_text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert license_text.startswith("MIT License\n")
    assert "Copyright (c)" in license_text and "the nxdrop authors" in license_text
    assert built.sdist_text("LICENSE") == license_text
    with zipfile.ZipFile(built.wheel) as whl:
        info = f"nxdrop-{VERSION}.dist-info"
        metadata = whl.read(f"{info}/METADATA").decode("utf-8")
        assert whl.read(f"{info}/licenses/LICENSE").decode("utf-8") == license_text
    for text in (metadata, built.sdist_text("PKG-INFO")):
        headers = text.partition("\n\n")[0].splitlines()
        assert "License-Expression: MIT" in headers
        assert "License-File: LICENSE" in headers
        # The deprecated forms: a free-text License field, a license classifier.
        assert not [h for h in headers if h.startswith(("License:", "Classifier: License"))]


def test_the_wheel_carries_the_package_and_its_data(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as whl:
        names = set(whl.namelist())
    assert "nxdrop/schemas/nexus-experiment.xsd" in names  # the default NX_SCHEMA_PATH
    assert {"nxdrop/__main__.py", "nxdrop/cli.py", "nxdrop/destinations/cdcs.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "docs/"))]


def test_the_wheel_installs_into_a_fresh_venv_and_runs(built: Built, tmp_path: Path) -> None:
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home)

    def run(*argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in argv],
            cwd=tmp_path,
            env=env | extra,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    installed = run(bin_dir / "pip", "install", "-q", built.wheel)
    assert installed.returncode == 0, installed.stderr[-3000:]

    version = run(bin_dir / "nxdrop", "--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"nxdrop {VERSION}")

    # Settings load (the schema shipped in the wheel is the default NX_SCHEMA_PATH) and the
    # built-in destinations are found through their entry points.
    listed = run(bin_dir / "nxdrop", "destinations", NX_ARCHIVE_PATH=str(tmp_path / "archive"))
    assert listed.returncode == 0, listed.stderr
    for name in ("cdcs", "elabftw", "archive"):
        assert re.search(rf"^\s*{name}\b", listed.stdout, re.M), listed.stdout
    assert "Traceback" not in listed.stderr

    # shtab is a declared dependency: completion works from the wheel alone.
    completion = run(bin_dir / "nxdrop", "completion", "bash")
    assert completion.returncode == 0, completion.stderr
    assert "complete " in completion.stdout and " nxdrop" in completion.stdout
