"""Shared fixtures: a clean environment for every test, the corpus, settings."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from nxdrop.app import App, build_app
from nxdrop.destinations.base import as_destination
from nxdrop.settings import Settings, load_settings

pytest_plugins = [
    "tests.fixtures.cdcs_fake",
    "tests.fixtures.cdcs_server",
    "tests.fixtures.elabftw_fake",
    "tests.fixtures.plugins",
    "tests.fixtures.relay",
    "tests.fixtures.service",
    "tests.fixtures.world",
]

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("NXDROP_SHARED", REPO.parent / "shared"))
CORPUS = SHARED / "corpus"
RECORDS = ("example_record.xml", "example_record_curation.xml")


POSTGRES_URL = os.environ.get("NXDROP_PG_URL", "postgresql://nxdrop@127.0.0.1:5432/nxdrop_test")


def unavailable(what: str) -> NoReturn:
    """A peer the tests need is missing: a skip on a laptop, a failure in CI (``CI=true``),
    where a skipped test must never count as a passed one."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} (CI=true: not skipping)", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The URL of the test database on the real PostgreSQL (``.ci/run`` creates it)."""
    try:
        import psycopg2

        psycopg2.connect(POSTGRES_URL).close()
    except Exception as exc:
        unavailable(f"PostgreSQL at {POSTGRES_URL} is not reachable: {exc}")
    return POSTGRES_URL


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's NX_* variables or systemd's directories."""
    for name in list(os.environ):
        if name.startswith("NX_") or name in (
            "CREDENTIALS_DIRECTORY",
            "STATE_DIRECTORY",
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "JOURNAL_STREAM",
        ):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The folder of real NexusLIMS records and the schema."""
    if not (CORPUS / "nexus-experiment.xsd").is_file():
        pytest.fail(f"the shared corpus is missing at {CORPUS} (set NXDROP_SHARED)")
    return CORPUS


@pytest.fixture
def drop(tmp_path: Path) -> Path:
    """An empty drop folder."""
    path = tmp_path / "drop"
    path.mkdir()
    return path


@pytest.fixture
def place(drop: Path, corpus: Path) -> Callable[..., Path]:
    """Copy a corpus record into the drop folder, optionally under another name."""

    def place(record: str = RECORDS[0], name: str | None = None) -> Path:
        target = drop / (name or record)
        shutil.copyfile(corpus / record, target)
        return target

    return place


@pytest.fixture
def make_app(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., App]]:
    """An :class:`App` exporting to the given destinations; keywords override settings."""
    made: list[App] = []

    def make(*destinations: Any, **overrides: Any) -> App:
        dests = [as_destination(d) for d in destinations]
        assert all(d is not None for d in dests), "not destinations"
        app = build_app(make_settings(**overrides), [d for d in dests if d is not None])
        made.append(app)
        app.connect()
        return app

    yield make
    for app in made:
        app.close()


@pytest.fixture
def make_settings(tmp_path: Path, drop: Path) -> Callable[..., Settings]:
    """Settings with the state and drop folders under ``tmp_path``; keywords override."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_path": tmp_path / "state",
            "drop_path": drop,
            "retry_max_time": 0,
            "http_timeout": 10,
        }
        values.update(overrides)
        return load_settings(**values)

    return make
