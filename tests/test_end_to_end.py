"""The whole story of the issue's "done when": records dropped, published to the real CDCS,
linked from an eLabFTW experiment with the XML attached, announced by a plugin, logged, and
archived; the contract's SQL answers about them; a re-drop publishes nothing twice.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

from tests.conftest import RECORDS
from tests.fixtures.cdcs_server import CDCSServer
from tests.fixtures.elabftw_fake import FakeELabFTW
from tests.fixtures.plugins import Webhook, env_with_path


def test_records_reach_cdcs_and_elabftw_and_the_log(
    cdcs_server: CDCSServer,
    elabftw_fake: FakeELabFTW,
    webhook: Webhook,
    webhook_site: Path,
    corpus: Path,
    drop: Path,
    tmp_path: Path,
) -> None:
    credentials = tmp_path / "credentials"  # as systemd's LoadCredential= lays them out
    credentials.mkdir()
    (credentials / "nx_cdcs_token").write_text(cdcs_server.user_token)
    (credentials / "nx_elabftw_api_key").write_text(elabftw_fake.api_key)
    env = env_with_path(
        webhook_site,
        CREDENTIALS_DIRECTORY=str(credentials),
        NX_DATA_PATH=str(tmp_path / "state"),
        NX_DROP_PATH=str(drop),
        NX_CDCS_URL=cdcs_server.url,
        NX_CDCS_TEMPLATE=cdcs_server.template_title,
        NX_ELABFTW_URL=elabftw_fake.url,
        NX_ELABFTW_EXPERIMENT_CATEGORY="Microscopy",
        NX_ELABFTW_EXPERIMENT_STATUS="Success",
        NX_WEBHOOK_URL=webhook.url,
        NX_RETRY_MAX_TIME="30",
    )
    tag = uuid.uuid4().hex[:8]  # the CDCS server outlives test runs
    names = {f"2024-01-15_FEI-Titan-TEM_{tag}_{i}.xml": record for i, record in enumerate(RECORDS)}

    def drop_and_run() -> subprocess.CompletedProcess[str]:
        for name, record in names.items():
            shutil.copyfile(corpus / record, drop / name)
        return subprocess.run(
            [sys.executable, "-m", "nxdrop", "run", "--once"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    run = drop_and_run()
    assert run.returncode == 0, run.stderr
    for secret in (cdcs_server.user_token, elabftw_fake.api_key):
        assert secret not in run.stdout + run.stderr

    db = sqlite3.connect(tmp_path / "state" / "nxdrop.db")
    public = cdcs_server.client.public_workspace()
    cdcs_urls = []
    for name, record in names.items():
        session = name.removesuffix(".xml")
        content = (corpus / record).read_bytes()
        assert (drop / "uploaded" / name).read_bytes() == content

        rows = db.execute(
            "SELECT destination_name, success, timestamp, error_message, record_id, record_url "
            "FROM upload_log WHERE session_identifier = ? ORDER BY timestamp DESC",
            (session,),
        ).fetchall()
        by_name = {r[0]: r for r in rows}
        assert sorted(by_name) == ["cdcs", "elabftw", "webhook"]
        assert all(r[1] == 1 and r[3] is None for r in rows)
        assert db.execute(
            "SELECT instrument, record_status, timestamp FROM session_log "
            "WHERE session_identifier = ?",
            (session,),
        ).fetchall()[0][:2] == ("FEI-Titan-TEM", "COMPLETED")

        cdcs_id, cdcs_url = by_name["cdcs"][4], by_name["cdcs"][5]
        published = cdcs_server.client.record(cdcs_id)
        assert published["xml_content"].encode() == content  # byte for byte, CRLF and all
        assert published["title"] == session
        assert published["workspace"] == public
        assert cdcs_url == f"{cdcs_server.url}data?id={cdcs_id}"
        cdcs_urls.append(cdcs_url)

        experiment = elabftw_fake.experiments[int(by_name["elabftw"][4])]
        assert f'href="{cdcs_url}"' in experiment["body"]
        [upload] = experiment["uploads"]
        assert upload["content"] == content
        assert by_name["elabftw"][5] == (
            f"{elabftw_fake.url}experiments.php?mode=view&id={experiment['id']}"
        )
    assert sorted(p["cdcs_url"] for p in webhook.posts) == sorted(cdcs_urls)

    # The builder drops the same records again: nothing is published twice.
    experiments_before = len(elabftw_fake.experiments)
    again = drop_and_run()
    assert again.returncode == 0, again.stderr
    for name in names:
        assert len(cdcs_server.client.records_titled(name.removesuffix(".xml"))) == 1
    assert len(elabftw_fake.experiments) == experiments_before
    assert len(webhook.posts) == len(names)
    states = db.execute(
        "SELECT state FROM upload_log WHERE destination_name IN ('cdcs', 'elabftw') ORDER BY id"
    ).fetchall()
    assert [s[0] for s in states] == ["succeeded"] * 4 + ["reused"] * 4
