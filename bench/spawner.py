"""A tiny process that starts the measured children and reports their rusage.

Linux records, at ``execve``, the high-water RSS of the memory the process had before it
(``exec_mmap`` → ``setmax_mm_hiwater_rss``): a child forked (or vforked, or
posix_spawned) from the bench, whose fakes hold every record they were sent, would report the
bench's RSS as its own peak. Forked from this process instead (``python -S -I``, some 8 MiB),
a child's ``ru_maxrss`` is its own, or this floor.

Protocol: one JSON line in (``argv``, ``env``, ``cwd``, ``log``: a file for stdout and stderr,
``timeout``: seconds, then SIGKILL), one JSON line out (``code``, ``wall``, ``cpu``,
``maxrss_kib``), until stdin closes. Standard library only.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def run(job: dict) -> dict:  # type: ignore[type-arg]
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(job["cwd"])
            null = os.open(os.devnull, os.O_RDONLY)
            log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.execve(job["argv"][0], job["argv"], job["env"])
        finally:
            os._exit(127)
    signal.signal(signal.SIGALRM, lambda *_: os.kill(pid, signal.SIGKILL))
    signal.alarm(max(1, int(job["timeout"])))
    _, status, usage = os.wait4(pid, 0)
    signal.alarm(0)
    return {
        "code": os.waitstatus_to_exitcode(status),
        "wall": time.monotonic() - started,
        "cpu": usage.ru_utime + usage.ru_stime,
        "maxrss_kib": usage.ru_maxrss,
    }


def main() -> None:
    for line in sys.stdin:
        sys.stdout.write(json.dumps(run(json.loads(line))) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
