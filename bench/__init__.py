"""nxdrop's benchmark suite (issue 11): nxdrop beside a minimal reference loop, same run.

    python -m bench                       # the full run: every scenario, median of 3 (~10 min)
    python -m bench --smoke               # every scenario once, small N (≤ 30 s; .ci/run)
    python -m bench --only cpu latency    # some scenarios
    python -m bench --json out.json       # every raw sample, the machine, the commit
    python -m bench --update-docs         # put the figures into docs/benchmarks.md

nxdrop (``nxdrop run`` / ``run --once``, default settings) and the reference loop
(``bench/reference.py``) run as child processes on real files; the fake CDCS and eLabFTW
(``bench/fakes.py``) run in this process. CPU and peak RSS come from each child's own
rusage. docs/benchmarks.md says what each figure measures and holds the latest figures.
The exit code is 1 only when a scenario broke, never for a missed target.

Modules: ``fakes`` (the fake servers), ``reference`` (the reference loop), ``procs``
(children, /proc, inotify, files), ``scenarios`` (against the fakes), ``realcdcs`` (against
the real CDCS), ``report`` (table, JSON, docs).
"""
