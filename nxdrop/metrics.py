"""Prometheus metrics: what nxdrop did and what it is doing, for dashboards and alerts.

One :class:`PrometheusMetrics` per process, in a registry of its own (no module state),
served on ``NX_METRICS_ADDRESS`` (loopback unless a host is given) and, with
``NX_METRICS_TEXTFILE``, written for node_exporter's textfile collector. With neither set,
nothing reads them: :func:`metrics_for` gives the plain :class:`Metrics`, which counts
nothing, and prometheus_client is not even imported (start-up time). Counters count since
the process started, as Prometheus expects; ``examples/grafana/nxdrop.json`` and
``examples/prometheus/nxdrop-alerts.yml`` read them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nxdrop import __version__
from nxdrop.exceptions import ConfigError

if TYPE_CHECKING:
    from nxdrop.settings import Settings

log = logging.getLogger(__name__)

# Seconds one destination may take for one record, retries included: most take well under a
# second, a retried one minutes.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def metrics_for(settings: Settings) -> Metrics:
    """Prometheus metrics where something reads them, else the ones that count nothing."""
    if settings.metrics_address or settings.metrics_textfile:
        return PrometheusMetrics()
    return Metrics()


class Metrics:
    """What nxdrop reports as it works; this one counts nothing (metrics are off)."""

    def destination_done(
        self, destination: str, result: str, *, calls: int, seconds: float, success: bool
    ) -> None:
        """One destination finished with one record."""

    def record_done(self, outcome: str) -> None:
        """One record file finished, with this outcome."""

    def gauges(self, *, queued: int, in_flight: int, database_up: bool) -> None:
        """What the daemon is doing now."""

    def serve(self, address: str) -> None:
        """Serve ``/metrics`` on ``address`` (``host:port``, or ``port`` for loopback)."""
        raise ConfigError(f"NX_METRICS_ADDRESS={address}: metrics are not collected")

    def write(self, path: Path) -> None:
        """Write the metrics for node_exporter's textfile collector (atomically)."""

    def close(self) -> None:
        """Stop serving."""


class PrometheusMetrics(Metrics):
    """Every metric nxdrop exports, in one registry."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.records = Counter(
            "nxdrop_records",
            "Record files finished, by outcome: exported, failed, rejected, abandoned",
            ["outcome"],
            registry=registry,
        )
        self.results = Counter(
            "nxdrop_destination_results",
            "Results of destinations, by what they did: succeeded (a new record), updated, "
            "reused, failed",
            ["destination", "result"],
            registry=registry,
        )
        self.calls = Counter(
            "nxdrop_destination_calls",
            "Calls made to a destination, retries included",
            ["destination"],
            registry=registry,
        )
        self.retries = Counter(
            "nxdrop_destination_retries",
            "Calls repeated after a transient failure",
            ["destination"],
            registry=registry,
        )
        self.duration = Histogram(
            "nxdrop_export_duration_seconds",
            "Time one destination took for one record, retries included",
            ["destination"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.last_success = Gauge(
            "nxdrop_last_success_timestamp_seconds",
            "When a destination last succeeded (Unix time)",
            ["destination"],
            registry=registry,
        )
        self.queued = Gauge(
            "nxdrop_queue_depth", "Record files ready and waiting for a worker", registry=registry
        )
        self.in_flight = Gauge(
            "nxdrop_exports_in_flight", "Record files being exported now", registry=registry
        )
        self.database_up = Gauge(
            "nxdrop_database_up",
            "1 while the database works, 0 while it is down",
            registry=registry,
        )
        self.database_up.set(1)
        Gauge("nxdrop_build_info", "nxdrop's version", ["version"], registry=registry).labels(
            __version__
        ).set(1)
        self._server: Any = None

    def destination_done(
        self, destination: str, result: str, *, calls: int, seconds: float, success: bool
    ) -> None:
        self.results.labels(destination, result).inc()
        self.calls.labels(destination).inc(calls)
        if calls > 1:
            self.retries.labels(destination).inc(calls - 1)
        self.duration.labels(destination).observe(seconds)
        if success:
            self.last_success.labels(destination).set(time.time())

    def record_done(self, outcome: str) -> None:
        self.records.labels(outcome).inc()

    def gauges(self, *, queued: int, in_flight: int, database_up: bool) -> None:
        self.queued.set(queued)
        self.in_flight.set(in_flight)
        self.database_up.set(1 if database_up else 0)

    def serve(self, address: str) -> None:
        from prometheus_client.exposition import start_http_server

        host, port = parse_address(address)
        try:
            self._server, _ = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"NX_METRICS_ADDRESS={address}: cannot listen: {exc}") from exc
        log.info("metrics on http://%s:%d/metrics", host, port)

    def write(self, path: Path) -> None:
        from prometheus_client import write_to_textfile

        try:
            write_to_textfile(str(path), self.registry)
        except OSError as exc:
            log.warning("cannot write the metrics to %s: %s", path, exc)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def parse_address(address: str) -> tuple[str, int]:
    """``host:port``, ``[::1]:port``, ``:port`` or ``port`` → (host, port); loopback when
    no host is given, so metrics are never exposed by accident."""
    host, _, port = address.strip().rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"NX_METRICS_ADDRESS={address}: not host:port") from None
    if not 0 < number < 65536:
        raise ConfigError(f"NX_METRICS_ADDRESS={address}: {number} is not a port")
    return host, number
