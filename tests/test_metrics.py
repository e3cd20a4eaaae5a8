"""Prometheus metrics scraped from a real ``nxdrop run`` while it exports 50 records, some of
which fail or are refused: every counter equals what the database and the folders say. And
the shipped Grafana dashboard and alert rule read only metrics nxdrop exports."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from nxdrop.exceptions import ConfigError
from nxdrop.metrics import PrometheusMetrics, parse_address
from tests.conftest import REPO
from tests.fixtures.plugins import install_plugin
from tests.fixtures.service import Service, record, wait_until

PICKY = '''
from nxdrop.destinations import ExportResult

class Picky:
    """Refuses every session whose name says so; a NexusLIMS-style plugin."""
    name = "picky"
    priority = 70
    enabled = True

    def validate_config(self):
        return True, None

    def export(self, context):
        ok = "fail" not in context.session_identifier
        return ExportResult(ok, self.name, record_id=context.session_identifier,
                            error_message=None if ok else "picky says no")
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``: (name, sorted labels) → value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_counters_equal_what_the_log_and_the_folders_say(
    service: Callable[..., Service], corpus: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    install_plugin(site, "picky", PICKY, {"picky": "picky:Picky"})
    port = free_port()
    svc = service(
        slow=False,
        site=site,
        NX_ARCHIVE_PATH=str(tmp_path / "archive"),
        NX_METRICS_ADDRESS=str(port),  # a port alone: loopback
        NX_METRICS_TEXTFILE=str(tmp_path / "nxdrop.prom"),
        NX_EXPORT_STRATEGY="best_effort",
    )
    svc.ready()
    for n in range(50):
        kind = "fail" if n % 10 == 3 else "bad" if n % 10 == 7 else "ok"
        content = b"<Experiment><oops/></Experiment>" if kind == "bad" else record(corpus, n)
        (svc.drop / f"2024-08-01_{kind}_{n:02d}.xml").write_bytes(content)
        if n == 20:  # scraped during the run, too
            assert scrape(port)[("nxdrop_build_info", (("version", "0.1.0"),))] == 1
    wait_until(
        lambda: len(list(svc.uploaded.iterdir())) + len(list(svc.failed.glob("*.xml"))) == 50,
        "all fifty finished",
    )
    wait_until(lambda: scrape(port)[("nxdrop_queue_depth", ())] == 0, "an empty queue")
    samples = scrape(port)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    uploaded = len(list(svc.uploaded.iterdir()))
    rejected = len(list(svc.failed.glob("*_bad_*.xml")))
    assert value("nxdrop_records_total", outcome="exported") == uploaded == 45
    assert value("nxdrop_records_total", outcome="rejected") == rejected == 5
    assert value("nxdrop_records_total", outcome="failed") == 0  # best_effort: archive held
    with sqlite3.connect(tmp_path / "state" / "nxdrop.db") as db:
        logged = dict(
            ((d, s), n)
            for d, s, n in db.execute(
                "SELECT destination_name, state, count(*) FROM upload_log GROUP BY 1, 2"
            )
        )
    for (destination, state), count in logged.items():
        assert value("nxdrop_destination_results_total", destination=destination, result=state) == (
            count
        ), (destination, state)
    assert logged[("picky", "failed")] == 5
    assert value("nxdrop_destination_calls_total", destination="archive") == 45
    assert value("nxdrop_export_duration_seconds_count", destination="archive") == 45
    assert value("nxdrop_last_success_timestamp_seconds", destination="picky") > 0
    assert value("nxdrop_database_up") == 1 and value("nxdrop_exports_in_flight") == 0
    wait_until(lambda: (tmp_path / "nxdrop.prom").exists(), "the textfile")
    assert "nxdrop_records_total" in (tmp_path / "nxdrop.prom").read_text()


def exported_names() -> set[str]:
    """The metric names nxdrop exports (with the suffixes Prometheus adds)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    names: set[str] = set()
    for family in PrometheusMetrics().registry.collect():
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    return names


def promql_metrics(expr: str) -> set[str]:
    """The metric names an expression reads (words that start like nxdrop's)."""
    return set(re.findall(r"\bnxdrop_[a-z_]+", expr))


def test_the_dashboard_and_the_alert_read_only_what_nxdrop_exports() -> None:
    dashboard = json.loads((REPO / "examples" / "grafana" / "nxdrop.json").read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    rules = yaml.safe_load((REPO / "examples" / "prometheus" / "nxdrop-alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    exprs += [rule["expr"] for rule in alerts]
    assert len(exprs) >= 6 and any("NothingExported" in r.get("alert", "") for r in alerts)
    known = exported_names()
    for expr in exprs:
        read = promql_metrics(expr)
        assert read, expr
        assert read <= known, (expr, read - known)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("9400", ("127.0.0.1", 9400)),
        (":9400", ("127.0.0.1", 9400)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::1]:9400", ("::1", 9400)),
    ],
)
def test_metrics_addresses_default_to_loopback(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["", "host", "host:99999", "host:http"])
def test_a_bad_metrics_address_names_the_variable(address: str) -> None:
    with pytest.raises(ConfigError, match="NX_METRICS_ADDRESS"):
        parse_address(address)
