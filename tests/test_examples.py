"""The shipped examples: the webhook plugin package installs with pip and works; env files parse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from nxdrop.settings import load_settings
from tests.conftest import REPO
from tests.fixtures.plugins import env_with_path


class Webhook(ThreadingHTTPServer):
    """Keeps every JSON body posted to it; answers 503 to the first ``failures`` posts."""

    def __init__(self, failures: int = 0) -> None:
        self.posts: list[dict[str, Any]] = []
        self.failures = failures
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler) -> None:  # `self` is the server here
                body = handler.rfile.read(int(handler.headers["Content-Length"]))
                with self.lock:
                    failing = self.failures > 0
                    self.failures -= failing
                    if not failing:
                        self.posts.append(json.loads(body))
                handler.send_response(503 if failing else 202)
                handler.send_header("Content-Length", "0")
                handler.send_header("X-Request-Id", f"req-{len(self.posts)}")
                handler.end_headers()

            def log_message(handler, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    server = Webhook(failures=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def webhook_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install` of examples/nxdrop-webhook into a folder, as a user would install it."""
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(REPO / "examples" / "nxdrop-webhook"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return target


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
