"""The real CDCS row: nxdrop (CDCS only) against a bare client on the same real server.

The server is the tests' core-main-app from ``$NXDROP_SHARED/peers/cdcs``, set up once in
``$NXDROP_CDCS_HOME`` (``.ci/run`` does it). The bench starts its own instance on a copy of
that home's database (the venv is shared, read only), so the records it makes never reach
the tests' database, and deletes the copy after.

nxdrop runs twice a repetition, each time with a fresh database, as the fakes' scenarios do:
first against a repository emptied of records (a first install: the census vouches that
the server held none of nxdrop's records, so each record is one request, the create), then
against the repository the first run filled (a fresh database in front of a server that
holds records: the census cannot vouch, so CDCS is asked which of the next 50 sessions it
holds records of, one listing for them all, then each record is created).
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median
from typing import Any

import requests

from bench.procs import (
    BenchError,
    Site,
    children,
    nxdrop_command,
    proc_cpu,
    record_bytes,
    run_child,
    write_records,
)
from bench.report import Outcome, Row
from bench.scenarios import Context

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("NXDROP_SHARED", REPO.parent / "shared"))


class Skipped(Exception):
    """The scenario cannot run here (no CDCS set up); an error under ``CI=true``."""


class RealCDCS:
    """A CDCS of the bench's own, on a free port, from a copy of the tests' CDCS home."""

    def __init__(self, work: Path) -> None:
        self.source = Path(os.environ.get("NXDROP_CDCS_HOME", "/tmp/nxdrop-cdcs-test"))
        self.home = work / "cdcs-home"
        self.peer = work / "cdcs-peer"
        self.url = self.token = self.template = self.workspace = ""
        self.pid = 0

    def __enter__(self) -> RealCDCS:
        ready = (self.source / "state/tokens.env").is_file() and (
            self.source / "venv/bin/gunicorn"
        ).is_file()
        if not ready:
            raise Skipped(f"no CDCS set up in {self.source} (set NXDROP_CDCS_HOME; .ci/run)")
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.peer, ignore_errors=True)
        shutil.copytree(SHARED / "peers" / "cdcs", self.peer)  # shared/ may be read-only
        shutil.copytree(self.peer / "project", self.home / "project")
        (self.home / "venv").symlink_to(self.source / "venv")
        state = self.home / "state"
        state.mkdir()
        for name in ("tokens.env", "template.env"):
            if (self.source / "state" / name).is_file():
                shutil.copy(self.source / "state" / name, state / name)
        if (self.source / "state/media").is_dir():
            shutil.copytree(self.source / "state/media", state / "media")
        source, copy = (
            sqlite3.connect(self.source / "state/db.sqlite3"),
            sqlite3.connect(state / "db.sqlite3"),
        )
        with source, copy:
            source.backup(copy)  # consistent even while the tests' CDCS writes
        source.close()
        copy.close()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.env = {
            **os.environ,
            "CDCS_HOME": str(self.home),
            "CDCS_PORT": str(port),
            "CDCS_XSD": str(SHARED / "corpus" / "nexus-experiment.xsd"),
        }
        self._script("start", 120)
        values = dict(
            line.split("=", 1) for line in self._script("env", 10).splitlines() if "=" in line
        )
        self.url, self.token = values["CDCS_URL"], values["CDCS_USER_TOKEN"]
        self.template = values["CDCS_TEMPLATE"]
        self.pid = int((self.home / f"server.{port}.pid").read_text())
        self.database = state / "db.sqlite3"
        spaces = requests.get(
            f"{self.url}rest/workspace/read_access/", headers=self.auth, timeout=30
        ).json()
        self.workspace = str(next(w["id"] for w in spaces if w["is_public"]))
        return self

    def __exit__(self, *exc: object) -> None:
        self._script("stop", 60)
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.peer, ignore_errors=True)

    def empty(self) -> None:
        """Delete every record (the template, users and workspaces stay): the repository
        a first install meets. Straight in the database: CDCS reads it at each request."""
        with sqlite3.connect(self.database) as db:
            db.execute("DELETE FROM core_main_app_databaselockobject")
            db.execute("DELETE FROM core_main_app_data")

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    def cpu(self) -> float:
        """CPU seconds of the server: gunicorn's master and its workers."""
        return proc_cpu(self.pid) + sum(proc_cpu(c) for c in children(self.pid))

    def _script(self, command: str, timeout: float) -> str:
        done = subprocess.run(
            ["bash", str(self.peer / "cdcs.sh"), command],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise BenchError(f"cdcs.sh {command} failed: {done.stdout}{done.stderr}")
        return done.stdout


def bare_client(server: RealCDCS, record: bytes, count: int, threads: int, tag: str) -> float:
    """Records/s of POST + assign from ``threads`` threads, a session each: from the first
    record done to the last, as nxdrop's rate is taken."""
    local = threading.local()
    finished: list[float] = []

    def one(number: int) -> None:
        if not hasattr(local, "http"):
            local.http = requests.Session()
        body = {
            "template": server.template,
            "title": f"bench-bare-{tag}-{number:05d}",
            "xml_content": record_bytes(record, tag, number).decode(),
        }
        made = local.http.post(
            f"{server.url}rest/data/", json=body, headers=server.auth, timeout=60
        )
        made.raise_for_status()
        path = f"rest/data/{made.json()['id']}/assign/{server.workspace}"
        local.http.patch(server.url + path, headers=server.auth, timeout=60).raise_for_status()
        finished.append(time.monotonic())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(count)))
    return (len(finished) - 1) / (max(finished) - min(finished))


def real_cdcs(ctx: Context) -> Outcome:
    """nxdrop ``run --once`` (CDCS only) vs the bare client, same real CDCS, small records:
    nxdrop on an empty repository and on one that holds records, each with a fresh database."""
    if not (SHARED / "peers" / "cdcs" / "cdcs.sh").is_file():
        raise Skipped(f"no {SHARED}/peers/cdcs (set NXDROP_SHARED)")
    samples: dict[str, list[Any]] = {"nxdrop": [], "nxdrop-holding": [], "bare": []}
    with RealCDCS(ctx.work) as server:
        for rep in range(ctx.repeat):
            tag = f"realcdcs-{time.time_ns() % 10**9}-{rep}"
            server.empty()
            samples["nxdrop"].append(_nxdrop(ctx, server, f"{tag}-a", "empty repository"))
            samples["nxdrop-holding"].append(_nxdrop(ctx, server, f"{tag}-b", "holding records"))
            trials = []
            for threads in ctx.sizes.threads:
                before = server.cpu()
                rate = bare_client(server, ctx.small, ctx.sizes.cdcs, threads, f"{tag}-{threads}")
                server_ms = (server.cpu() - before) / ctx.sizes.cdcs * 1000
                trials.append({"threads": threads, "rate": rate, "server_cpu_ms": server_ms})
                ctx.say(
                    f"bare      {threads} threads: {rate:.1f} rec/s, server {server_ms:.1f} ms/rec"
                )
            samples["bare"].append({"trials": trials, "best": max(trials, key=lambda t: t["rate"])})
        server_cpu = server.cpu()  # all of it since it started: ours, not another's load
    best = [s["best"] for s in samples["bare"]]
    bare = median(b["rate"] for b in best)
    threads = f"{median(b['threads'] for b in best):g} threads"
    rows = []
    states = (
        ("nxdrop", "empty repository", "the create alone"),
        ("nxdrop-holding", "holding records", "a listing per 50, then the create"),
    )
    for key, state, requests_made in states:
        nx = median(s["rate"] for s in samples[key])
        rows.append(
            Row(
                f"real CDCS, CDCS only, {state}: records/s (reference: bare POST + assign)",
                "rec/s",
                nx,
                bare,
                1,
                "≥ 0.9× bare client",
                nx >= 0.9 * bare,
                nx / bare,
                reference_note=threads,
            )
        )
        rows.append(
            Row(
                f"real CDCS, {state}: the server's own CPU per record",
                "ms",
                median(s["server_cpu_ms"] for s in samples[key]),
                median(b["server_cpu_ms"] for b in best),
                1,
                nxdrop_note=requests_made,
            )
        )
    return Outcome(rows, samples, outside_cpu=server_cpu)


def _nxdrop(ctx: Context, server: RealCDCS, tag: str, state: str) -> dict[str, Any]:
    """One ``nxdrop run --once`` over new records, with a database of its own."""
    count = ctx.sizes.cdcs
    site = Site.make(ctx.work, tag)
    names = write_records(site.drop, ctx.small, count, tag)
    argv, env = nxdrop_command(
        site, once=True, NX_CDCS_URL=server.url, NX_CDCS_TOKEN=server.token,
        NX_CDCS_TEMPLATE=server.template,
    )  # fmt: skip
    before = server.cpu()
    run = run_child(argv, env, site.root)
    server_ms = (server.cpu() - before) / count * 1000
    if run.code != 0:
        raise BenchError(f"nxdrop against the real CDCS exited {run.code}:\n{run.log}")
    site.check_exported(names, run)
    rate = site.steady_rate()
    ctx.say(
        f"nxdrop    {count} records, {state}: {rate or 0:.1f} rec/s, server {server_ms:.1f} ms/rec"
    )
    ctx.done(site)
    return {**run.as_dict(), "rate": rate, "server_cpu_ms": server_ms}
