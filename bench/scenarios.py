"""The scenarios against the in-process fakes: nxdrop and the reference loop side by side,
each program a child process on real files, one after the other within each repetition."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

from bench.fakes import FakeCDCS, FakeELabFTW, FakeServers
from bench.procs import (
    Arrivals,
    BenchError,
    Daemon,
    Site,
    nxdrop_command,
    record_bytes,
    reference_command,
    run_child,
    session_name,
    threads_cpu,
    write_records,
)
from bench.report import Outcome, Row, ratio_row

PROGRAMS = ("nxdrop", "reference")
WATCHDOG_USEC = "30000000"  # systemd/nxdrop.service: WatchdogSec=30s


@dataclass(frozen=True)
class Sizes:
    """How much each scenario does: ``--smoke`` proves every one runs, the full run measures."""

    cpu_small: tuple[int, int]  # the two N whose CPU difference gives CPU per record
    cpu_large: tuple[int, int]
    backlog: tuple[int, int]  # the two backlogs (RSS compared; the larger one's rate)
    throughput: tuple[int, int]  # records at 10 ms/request: nxdrop's, the reference's
    latency: int  # samples per program and repetition
    warmup: int  # records dropped first, not counted
    startup_runs: int
    idle_seconds: float
    cdcs: int  # records per run against the real CDCS
    threads: tuple[int, ...]  # the bare client's thread counts


FULL = Sizes(
    (50, 300), (20, 200), (1_000, 10_000), (1_000, 300), 200, 5, 7, 20.0, 150, (1, 2, 4, 8)
)
SMOKE = Sizes((2, 6), (2, 6), (20, 60), (20, 10), 10, 1, 1, 3.0, 10, (1, 2, 4, 8))


@dataclass
class Context:
    sizes: Sizes
    repeat: int
    backlog_repeat: int
    work: Path
    small: bytes
    large: bytes
    xsd: str
    keep: bool = False

    def say(self, message: str) -> None:
        print(f"    {message}", file=sys.stderr, flush=True)

    def done(self, site: Site) -> None:
        if not self.keep:
            site.remove()


def _command(
    program: str, site: Site, once: bool, cdcs: FakeCDCS, elab: FakeELabFTW, **extra: str
) -> tuple[list[str], dict[str, str]]:
    if program == "nxdrop":
        return nxdrop_command(site, once=once, cdcs=cdcs, elab=elab, **extra)
    return reference_command(site, once=once, cdcs=cdcs, elab=elab, **extra)


def once_pass(
    ctx: Context, program: str, record: bytes, count: int, tag: str, latency: float = 0.0
) -> dict[str, Any]:
    """``count`` records in a fresh drop folder, one ``once`` run of ``program`` over them
    against fresh fakes; checked: exit 0, every file in ``uploaded/``."""
    cdcs, elab = FakeCDCS(ctx.xsd), FakeELabFTW()
    site = Site.make(ctx.work, tag)
    names = write_records(site.drop, record, count, tag)
    with FakeServers(cdcs, elab, latency=latency) as servers:
        argv, env = _command(program, site, True, cdcs, elab)
        run = run_child(argv, env, site.root)
        if run.code != 0:
            raise BenchError(f"{program} ({tag}) exited with {run.code}:\n{run.log[-1500:]}")
        site.check_exported(names, run)
        titles, sessions = servers.call(cdcs.titles), servers.call(elab.sessions)
        routes = {" ".join(k): n for k, n in sorted(servers.counts.items())}
        requests = servers.total()
        connections = sum(servers.connections.values())
    result = {
        "n": count,
        **run.as_dict(),
        "rate": site.steady_rate(),
        "requests": requests,
        "connections": connections,
        "routes": routes,
        # A record more than one per session, or a session without one.
        "duplicates": {
            "cdcs": sum(n - 1 for n in titles.values()) + count - len(titles),
            "elabftw": sum(n - 1 for n in sessions.values()) + count - len(sessions),
        },
    }
    ctx.done(site)
    ctx.say(
        f"{program:9} {tag:20} {count:6} records: {run.wall:6.2f} s, CPU {run.cpu:6.2f} s, "
        f"{result['rate'] or 0:6.1f} rec/s, {requests} requests, "
        f"peak RSS {run.maxrss_kib / 1024:.0f} MiB"
    )
    return result


def _cpu(ctx: Context, record: bytes, sizes: tuple[int, int], label: str) -> Outcome:
    n1, n2 = sizes
    samples: dict[str, list[dict[str, Any]]] = {p: [] for p in PROGRAMS}
    for rep in range(ctx.repeat):
        for program in PROGRAMS:
            a = once_pass(ctx, program, record, n1, f"{label}-{program[:3]}{rep}a")
            b = once_pass(ctx, program, record, n2, f"{label}-{program[:3]}{rep}b")
            samples[program].append(
                {
                    "cpu_per_record_ms": (b["cpu"] - a["cpu"]) / (n2 - n1) * 1000,
                    "requests_per_record": (b["requests"] - a["requests"]) / (n2 - n1),
                    "connections_per_record": (b["connections"] - a["connections"]) / (n2 - n1),
                    "runs": [a, b],
                }
            )

    def values(program: str, key: str) -> list[float]:
        return [s[key] for s in samples[program]]

    name = {"small": "small record", "large": f"{len(record) / 1000:.0f} KB corpus record"}[label]
    rows = [
        ratio_row(
            f"CPU per record, 0 ms servers, {name}",
            "ms",
            values("nxdrop", "cpu_per_record_ms"),
            values("reference", "cpu_per_record_ms"),
            most=1.5,
            digits=2,
        )
    ]
    notes = []
    if label == "small":
        nx, ref = (
            values("nxdrop", "requests_per_record"),
            values("reference", "requests_per_record"),
        )
        row = Row("requests per record", "", median(nx), median(ref), 1)
        for program in PROGRAMS:  # a new TCP connection (a TLS handshake, in production)
            new = median(values(program, "connections_per_record"))
            setattr(row, f"{program}_note", f"{new:.2f} new connections")
        rows.append(row)
        for program in PROGRAMS:
            a, b = samples[program][0]["runs"]
            routes = {k: (n - a["routes"].get(k, 0)) / (n2 - n1) for k, n in b["routes"].items()}
            each = ", ".join(f"{k} {n:g}" for k, n in routes.items() if n)
            notes.append(f"{program}'s requests per record: {each}")
    return Outcome(rows, {"n": sizes, **samples}, notes)


def cpu_small(ctx: Context) -> Outcome:
    """CPU per record (small record) and requests per record: the slope between two N."""
    return _cpu(ctx, ctx.small, ctx.sizes.cpu_small, "small")


def cpu_large(ctx: Context) -> Outcome:
    """CPU per record, the 90 KB corpus record."""
    return _cpu(ctx, ctx.large, ctx.sizes.cpu_large, "large")


def backlog(ctx: Context) -> Outcome:
    """Two backlogs at 0 ms: the larger one's rate and wall time, both peak RSS
    (``--backlog-repeat`` times each, 1 by default: a 10,000 backlog is its own average)."""
    smaller, larger = ctx.sizes.backlog
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for count in (smaller, larger):
        samples[str(count)] = {p: [] for p in PROGRAMS}
        for rep in range(ctx.backlog_repeat):
            for program in PROGRAMS:
                tag = f"backlog{count}-{program[:3]}{rep}"
                samples[str(count)][program].append(once_pass(ctx, program, ctx.small, count, tag))

    def values(count: int, program: str, key: str) -> list[float]:
        return [s[key] for s in samples[str(count)][program]]

    def mib(count: int, program: str) -> float:
        return median(values(count, program, "maxrss_kib")) / 1024

    walls = {p: f"{median(values(larger, p, 'wall')):.0f} s" for p in PROGRAMS}
    rate = ratio_row(
        f"{larger:,}-record backlog, 0 ms servers",
        "rec/s",
        values(larger, "nxdrop", "rate"),
        values(larger, "reference", "rate"),
        least=0.8,
        digits=0,
        nxdrop_note=walls["nxdrop"],
        reference_note=walls["reference"],
    )
    small_rss = Row(
        f"peak RSS, {smaller:,} backlog", "MiB", mib(smaller, "nxdrop"), mib(smaller, "reference")
    )
    growth = mib(larger, "nxdrop") - mib(smaller, "nxdrop")
    large_rss = Row(
        f"peak RSS, {larger:,} backlog",
        "MiB",
        mib(larger, "nxdrop"),
        mib(larger, "reference"),
        target=f"≤ 60 MiB and ≤ {smaller:,}'s + 5",
        met=mib(larger, "nxdrop") <= 60 and growth <= 5,
        nxdrop_note=f"{growth:+.1f}",
        reference_note=f"{mib(larger, 'reference') - mib(smaller, 'reference'):+.1f}",
    )
    return Outcome([rate, small_rss, large_rss], samples)


def throughput(ctx: Context) -> Outcome:
    """Records/s with every request taking 10 ms; default settings; no duplicates."""
    counts = dict(zip(PROGRAMS, ctx.sizes.throughput, strict=True))
    samples: dict[str, list[dict[str, Any]]] = {p: [] for p in PROGRAMS}
    for rep in range(ctx.repeat):
        for program in PROGRAMS:
            tag = f"tput-{program[:3]}{rep}"
            samples[program].append(once_pass(ctx, program, ctx.small, counts[program], tag, 0.010))
    duplicates = sum(sum(s["duplicates"].values()) for p in PROGRAMS for s in samples[p])
    row = ratio_row(
        f"throughput at 10 ms/request, {counts['nxdrop']:,} records, default workers",
        "rec/s",
        [s["rate"] for s in samples["nxdrop"]],
        [s["rate"] for s in samples["reference"]],
        least=4,
        nxdrop_note=f"{duplicates} duplicates",
        reference_note=f"{counts['reference']:,} records",
    )
    row.target += ", 0 duplicates"
    row.met = bool(row.met) and duplicates == 0
    return Outcome([row], {"n": counts, **samples})


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * p / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _latencies(ctx: Context, program: str, tag: str) -> list[float]:
    """Milliseconds from the rename into the drop folder to the arrival in ``uploaded/``."""
    cdcs, elab = FakeCDCS(ctx.xsd), FakeELabFTW()
    site = Site.make(ctx.work, tag)
    site.uploaded.mkdir()
    samples = []
    with FakeServers(cdcs, elab):
        argv, env = _command(program, site, False, cdcs, elab, WATCHDOG_USEC=WATCHDOG_USEC)
        with Daemon(argv, env, site.root) as daemon:
            daemon.wait_ready()
            arrivals = Arrivals(site.uploaded)
            try:
                for number in range(ctx.sizes.warmup + ctx.sizes.latency):
                    name = session_name(tag, number)
                    part = site.drop / f".{name}.part"
                    part.write_bytes(record_bytes(ctx.small, tag, number))
                    started = time.perf_counter()
                    os.rename(part, site.drop / name)
                    try:
                        arrived = arrivals.wait_for(name, 30)
                    except BenchError as exc:
                        raise BenchError(f"{program}: {exc}\n{daemon.log}") from None
                    if number >= ctx.sizes.warmup:
                        samples.append((arrived - started) * 1000)
                    time.sleep(0.01)
            finally:
                arrivals.close()
    ctx.done(site)
    return samples


def latency(ctx: Context) -> Outcome:
    """Rename → ``uploaded/`` of one small record at a time, daemon already running."""
    samples: dict[str, list[dict[str, Any]]] = {p: [] for p in PROGRAMS}
    for rep in range(ctx.repeat):
        for program in PROGRAMS:
            ms = _latencies(ctx, program, f"lat-{program[:3]}{rep}")
            p50, p99 = percentile(ms, 50), percentile(ms, 99)
            samples[program].append({"p50": p50, "p99": p99, "ms": [round(x, 3) for x in ms]})
            ctx.say(f"{program:9} latency rep {rep}: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    rows = []
    for key, most in (("p50", 10), ("p99", 30)):
        nx = median(s[key] for s in samples["nxdrop"])
        ref = median(s[key] for s in samples["reference"])
        figure = f"latency rename → uploaded/, {key} (small, 0 ms)"
        rows.append(Row(figure, "ms", nx, ref, 1, f"≤ {most} ms", nx <= most, nx / ref))
    return Outcome(rows, samples)


def startup(ctx: Context) -> Outcome:
    """Wall time of ``run --once`` on an empty folder (destinations configured)."""
    cdcs, elab = FakeCDCS(ctx.xsd), FakeELabFTW()
    site = Site.make(ctx.work, "startup")
    samples: dict[str, list[dict[str, Any]]] = {"nxdrop": [], "reference": [], "import": []}
    with FakeServers(cdcs, elab):
        for _ in range(ctx.sizes.startup_runs):
            for program in PROGRAMS:
                run = run_child(*_command(program, site, True, cdcs, elab), site.root)
                if run.code != 0:
                    raise BenchError(f"{program} on an empty folder exited {run.code}:\n{run.log}")
                samples[program].append(run.as_dict())
            bare = [sys.executable, "-c", "import requests"]
            samples["import"].append(run_child(bare, os.environ.copy(), site.root).as_dict())
    ctx.done(site)

    def ms(program: str) -> float:
        return median(s["wall"] for s in samples[program]) * 1000

    row = Row("`run --once` on an empty folder", "ms", ms("nxdrop"), ms("reference"), 0)
    row.target, row.met, row.ratio = "≤ 250 ms", ms("nxdrop") <= 250, ms("nxdrop") / ms("reference")
    scale = Row("python -c 'import requests' (for scale)", "ms", None, ms("import"), 0)
    return Outcome([row, scale], samples)


def idle(ctx: Context) -> Outcome:
    """CPU of ``nxdrop run`` with nothing to do (inotify, systemd's watchdog pings on)."""
    cdcs, elab = FakeCDCS(ctx.xsd), FakeELabFTW()
    site = Site.make(ctx.work, "idle")
    windows = []
    with FakeServers(cdcs, elab):
        argv, env = nxdrop_command(
            site, once=False, cdcs=cdcs, elab=elab, WATCHDOG_USEC=WATCHDOG_USEC
        )
        with Daemon(argv, env, site.root) as daemon:
            daemon.wait_ready()
            time.sleep(1)
            for _ in range(3):
                cpu, wall = threads_cpu(daemon.pid), time.monotonic()
                time.sleep(ctx.sizes.idle_seconds / 3)
                used = threads_cpu(daemon.pid) - cpu
                windows.append(used / (time.monotonic() - wall) * 100)
    ctx.done(site)
    nx = median(windows)
    row = Row("idle, inotify, nothing to do", "% of a core", nx, None, 3, "≤ 0.5 %", nx <= 0.5)
    return Outcome([row], {"window_seconds": ctx.sizes.idle_seconds / 3, "percent": windows})


Scenario = Callable[[Context], Outcome]
