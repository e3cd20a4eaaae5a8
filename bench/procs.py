"""Child processes and what is read off them: nxdrop and the reference loop as subprocesses,
their rusage, /proc, a notify socket for readiness, inotify for arrivals, record files."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.fakes import FakeCDCS, FakeELabFTW

REFERENCE = Path(__file__).resolve().parent / "reference.py"
SPAWNER = REFERENCE.with_name("spawner.py")
TICK = os.sysconf("SC_CLK_TCK")
_SCRUBBED = ("NX_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM", "CREDENTIALS_DIRECTORY")
_SCRUBBED += ("STATE_DIRECTORY",)


class BenchError(Exception):
    """A scenario that did not run as it must (a child failed, a file went missing)."""


# -- folders and records ---------------------------------------------------------------------


@dataclass
class Site:
    """One run's folders: the drop folder (``uploaded/``, ``failed/`` in it) and state."""

    root: Path

    @property
    def drop(self) -> Path:
        return self.root / "drop"

    @property
    def uploaded(self) -> Path:
        return self.drop / "uploaded"

    @property
    def failed(self) -> Path:
        return self.drop / "failed"

    @classmethod
    def make(cls, base: Path, name: str) -> Site:
        root = base / name
        shutil.rmtree(root, ignore_errors=True)
        (root / "drop").mkdir(parents=True)
        return cls(root)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def check_exported(self, names: list[str], run: Run | None = None) -> None:
        """Every one of ``names`` is in ``uploaded/``, nothing in ``failed/`` or left over."""
        done = {p.name for p in self.uploaded.glob("*.xml")} if self.uploaded.is_dir() else set()
        missing = [n for n in names if n not in done]
        failed = sorted(p.name for p in self.failed.glob("*.xml")) if self.failed.is_dir() else []
        if missing or failed:
            tail = f"\n{run.log[-1500:]}" if run is not None else ""
            raise BenchError(
                f"{len(missing)} of {len(names)} records not in uploaded/ "
                f"(e.g. {missing[:2]}), {len(failed)} in failed/ {failed[:2]}{tail}"
            )

    def steady_rate(self) -> float | None:
        """Records per second from the first to the last file moved into ``uploaded/``
        (their ctimes: a rename sets it; the kernel's clock ticks at 4 ms here)."""
        times = sorted(p.stat().st_ctime_ns for p in self.uploaded.glob("*.xml"))
        if len(times) < 2 or times[-1] == times[0]:
            return None
        return (len(times) - 1) / ((times[-1] - times[0]) / 1e9)


def session_name(tag: str, number: int) -> str:
    """A record's file name, its session identifier: ``<date>_<instrument>_<id>.xml``."""
    return f"2024-01-15_FEI-Titan-TEM_{tag}-{number:05d}.xml"


def record_bytes(source: bytes, tag: str, number: int) -> bytes:
    """``source`` with a comment after the XML declaration: each file's SHA-256 is its own."""
    head, rest = source.split(b"\n", 1)
    return head + f"\n<!-- bench {tag} {number} -->\n".encode() + rest


def write_records(folder: Path, source: bytes, count: int, tag: str) -> list[str]:
    """``count`` records of distinct sessions, written an hour ago (a backlog: nothing for
    nxdrop to wait to settle)."""
    old = time.time() - 3600
    names = []
    for number in range(count):
        name = session_name(tag, number)
        path = folder / name
        path.write_bytes(record_bytes(source, tag, number))
        os.utime(path, (old, old))
        names.append(name)
    return names


# -- commands --------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}
    env.update(extra)
    return env


def nxdrop_command(
    site: Site,
    *,
    once: bool,
    cdcs: FakeCDCS | None = None,
    elab: FakeELabFTW | None = None,
    **extra: str,
) -> tuple[list[str], dict[str, str]]:
    """``nxdrop run [--once]`` on ``site`` with default settings, to the given fakes."""
    env = clean_env(NX_DATA_PATH=str(site.root / "state"), NX_DROP_PATH=str(site.drop))
    if cdcs is not None:
        env.update(NX_CDCS_URL=cdcs.url, NX_CDCS_TOKEN=cdcs.token)
    if elab is not None:
        env.update(NX_ELABFTW_URL=elab.url, NX_ELABFTW_API_KEY=elab.api_key)
    env.update(extra)
    argv = [sys.executable, "-m", "nxdrop", "run", *(["--once"] if once else [])]
    return argv, env


def reference_command(
    site: Site, *, once: bool, cdcs: FakeCDCS, elab: FakeELabFTW | None = None, **extra: str
) -> tuple[list[str], dict[str, str]]:
    """The reference loop on ``site``, to the given fakes."""
    argv = [sys.executable, str(REFERENCE), "once" if once else "watch", "--drop", str(site.drop)]
    argv += ["--cdcs", cdcs.url, "--cdcs-token", cdcs.token, "--template", cdcs.template_id]
    argv += ["--workspace", str(cdcs.workspace_id)]
    if elab is not None:
        argv += ["--elab", elab.url, "--elab-key", elab.api_key]
    return argv, clean_env(**extra)


# -- running them ----------------------------------------------------------------------------


@dataclass
class Run:
    """A finished child: exit code, wall seconds, CPU seconds (user + system, its rusage),
    peak RSS in KiB, and its stderr."""

    code: int
    wall: float
    cpu: float
    maxrss_kib: int
    log: str

    def as_dict(self) -> dict[str, Any]:
        """The figures, for the JSON (not the log)."""
        figures = {k: v for k, v in vars(self).items() if k != "log"}
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in figures.items()}


_spawner: subprocess.Popen[str] | None = None


def run_child(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 900) -> Run:
    """Run to the end; wall time, CPU and peak RSS from the child's own ``wait4``, taken by
    :mod:`bench.spawner` (which see: why the bench does not fork the child itself)."""
    global _spawner
    if _spawner is None or _spawner.poll() is not None:
        _spawner = subprocess.Popen(
            [sys.executable, "-S", "-I", str(SPAWNER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
    assert _spawner.stdin is not None and _spawner.stdout is not None
    with tempfile.NamedTemporaryFile(prefix="nxbench-", suffix=".log") as log:
        job = {"argv": argv, "env": env, "cwd": str(cwd), "log": log.name, "timeout": timeout}
        _spawner.stdin.write(json.dumps(job) + "\n")
        _spawner.stdin.flush()
        done = json.loads(_spawner.stdout.readline())
        text = Path(log.name).read_text(encoding="utf-8", errors="replace")
    return Run(done["code"], done["wall"], done["cpu"], done["maxrss_kib"], text)


class Daemon:
    """A long-running child (``nxdrop run``, ``reference.py watch``) that says READY=1 to
    the notify socket it is given, as to systemd; SIGTERM at ``__exit__``."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.argv = argv
        self.notify = NotifySocket()
        self.log_file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by __exit__
        self.proc = subprocess.Popen(
            argv,
            env={**env, "NOTIFY_SOCKET": self.notify.path},
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=self.log_file,
        )

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.notify.close()
        self.log_file.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60) -> float:
        """Seconds until READY=1."""
        started = time.monotonic()
        while not self.notify.seen("READY=1"):
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.argv[1:4]} exited with {self.proc.returncode}:\n{self.log}"
                )
            if time.monotonic() - started > timeout:
                raise BenchError(f"no READY=1 from {self.argv[1:4]} in {timeout} s:\n{self.log}")
            time.sleep(0.005)
        return time.monotonic() - started

    @property
    def log(self) -> str:
        self.log_file.seek(0)
        return self.log_file.read().decode("utf-8", "replace")[-1500:]

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class NotifySocket:
    """The service manager's end of ``sd_notify``: every datagram read as it comes."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="nxb")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.lines += data.decode("utf-8", "replace").splitlines()

    def seen(self, line: str) -> bool:
        return line in self.lines

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- /proc -----------------------------------------------------------------------------------


def proc_cpu(pid: int, *, reaped: bool = False) -> float:
    """CPU seconds of a process, all its threads, dead ones included (/proc/<pid>/stat
    utime + stime, in clock ticks of 10 ms); with ``reaped``, also that of the children it
    has waited for (cutime + cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(f) for f in fields[11 : 15 if reaped else 13]) / TICK


def spawner_cpu() -> float:
    """CPU seconds of the spawner and of the children it has run: the bench's own rusage
    never counts them, as the spawner lives on and reaps them itself."""
    if _spawner is None or _spawner.poll() is not None:
        return 0.0
    try:
        return proc_cpu(_spawner.pid, reaped=True)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


def threads_cpu(pid: int) -> float:
    """CPU seconds of a process's live threads, to the nanosecond (/proc/<pid>/task/*/schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def children(pid: int) -> list[int]:
    """A process's child processes."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


class Others:
    """How busy the machine was with other processes meanwhile (others' benchmarks or tests
    skew every figure): its busy time from /proc/stat less this process's, its children's
    and the measured children's (run by the spawner), as a share of all cores."""

    def __init__(self) -> None:
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float]:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / TICK  # less idle and iowait
        own = sum(
            u.ru_utime + u.ru_stime
            for u in (
                resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN),
            )
        )
        return time.monotonic(), busy, own + spawner_cpu()

    def share(self, outside: float = 0.0) -> float:
        """Percent of the machine's cores that others used since this was made, less
        ``outside`` CPU seconds that were ours after all (a server the bench started)."""
        (t0, busy0, own0), (t1, busy1, own1) = self.start, self._now()
        others = max(0.0, (busy1 - busy0) - (own1 - own0) - outside)
        return others / ((t1 - t0) * (os.cpu_count() or 1)) * 100


# -- inotify ---------------------------------------------------------------------------------

_IN_MOVED_TO, _IN_CREATE, _IN_CLOEXEC, _IN_NONBLOCK = 0x80, 0x100, 0o2000000, 0o4000
_EVENT = struct.Struct("iIII")


class Arrivals:
    """inotify on one folder: when a name was renamed or created in it (``wait_for``)."""

    def __init__(self, folder: Path) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(_IN_CLOEXEC | _IN_NONBLOCK)
        if (
            self.fd < 0
            or libc.inotify_add_watch(self.fd, os.fsencode(folder), _IN_MOVED_TO | _IN_CREATE) < 0
        ):
            raise OSError(ctypes.get_errno(), f"inotify on {folder}")
        self.seen: dict[str, float] = {}

    def wait_for(self, name: str, timeout: float) -> float:
        """``time.perf_counter()`` when ``name`` arrived (read as soon as the kernel tells)."""
        deadline = time.perf_counter() + timeout
        while name not in self.seen:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise BenchError(f"{name} did not arrive within {timeout} s")
            if select.select([self.fd], [], [], left)[0]:
                self._read(time.perf_counter())
        return self.seen.pop(name)

    def _read(self, now: float) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        while offset < len(data):
            _, _, _, length = _EVENT.unpack_from(data, offset)
            start = offset + _EVENT.size
            raw = data[start : start + length].rstrip(b"\0")
            self.seen.setdefault(os.fsdecode(raw), now)
            offset = start + length

    def close(self) -> None:
        os.close(self.fd)
