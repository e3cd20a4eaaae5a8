"""The fake CDCS (tests/fixtures/cdcs_fake.py) answers like the real one.

One scripted conversation runs against the real CDCS and against the fake: at every step
both must give the same status and a body of the same shape (the same JSON keys, the same
JSON types), and where it matters the same message. The conversation also checks what a
step means (a second record for a duplicate title, newest first, …) on each server.

It speaks HTTP with ``requests`` only and imports nothing from nxdrop, so it keeps working
while the package is being rewritten.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.fixtures.cdcs_fake import FakeCDCS, start_fake_cdcs
from tests.fixtures.cdcs_server import CDCSServer

TIMEOUT = 30
EXTRA = 9  # records beyond the first two, so that a title's list has two pages of 10


@dataclass(frozen=True)
class Step:
    """What one request got back, reduced to what both servers must agree on."""

    name: str
    status: int
    shape: Any
    message: str | None = None  # compared only where the step asks for it
    location: str | None = None  # a redirect's or page link's target, ids and host removed


def shape(value: Any) -> Any:
    """The JSON's structure: keys kept, values replaced by their JSON type."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return "null" if value is None else type(value).__name__


class Conversation:
    """Talks to one CDCS at ``url`` and keeps a :class:`Step` per request."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.steps: list[Step] = []

    def call(
        self, method: str, path: str, *, token: str | None = "", **kwargs: Any
    ) -> requests.Response:
        """One request, not recorded; ``token=None`` sends none, ``""`` the user's."""
        headers = {} if token is None else {"Authorization": f"Token {token or self.token}"}
        # A connection each: a server that answers 301 to a POST without reading its body
        # may drop the connection under the next request, which is not what is compared.
        headers["Connection"] = "close"
        return requests.request(
            method,
            self.url + path,
            headers=headers,
            timeout=TIMEOUT,
            allow_redirects=False,  # a 301 is one of the answers being compared
            **kwargs,
        )

    def step(
        self,
        name: str,
        method: str,
        path: str,
        expect: int,
        *,
        message: bool = False,
        **kwargs: Any,
    ) -> Any:
        """One recorded request that must answer ``expect``; its decoded JSON, if any."""
        response = self.call(method, path, **kwargs)
        kind = response.headers.get("Content-Type", "")
        body = response.json() if kind.startswith("application/json") else None
        if body is not None:
            form: Any = shape(body)
        else:  # an HTML page or nothing at all: which of the two is what matters
            form = "html" if kind.startswith("text/html") and response.content else "empty"
        text = None
        if message and isinstance(body, dict):
            text = str(body.get("message", body.get("detail")))
        self.steps.append(
            Step(name, response.status_code, form, text, self._neutral(response.headers))
        )
        assert response.status_code == expect, f"{name}: {response.status_code} {body}"
        return body

    def _neutral(self, headers: Any) -> str | None:
        location = headers.get("Location")
        return None if location is None else re.sub(r"\d+", "<n>", location)


def converse(
    url: str, token: str, other_token: str, admin_token: str, template_title: str, corpus: Path
) -> list[Step]:
    """The scripted conversation; ``other_token``'s user may not publish; ``admin_token`` is
    a superuser's."""
    alice = Conversation(url, token)
    bob = Conversation(url, other_token)
    admin = Conversation(url, admin_token)
    xml = (corpus / "example_record.xml").read_text(encoding="utf-8")
    xml2 = (corpus / "example_record_curation.xml").read_text(encoding="utf-8")
    invalid = xml.replace("<project>", "<bogus/><project>", 1)  # well-formed, not valid
    title = f"fake-fidelity-{uuid.uuid4().hex}"  # the real server keeps records between runs

    managers = alice.step("templates", "GET", "rest/template-version-manager/global/", 200)
    template = next(m["current"] for m in managers if m["title"] == template_title)
    xsd = alice.step("template", "GET", f"rest/template/{template}/", 200)
    # DRF's CharField trims the uploaded XSD (trim_whitespace): its final newline is gone.
    assert xsd["content"] == (corpus / "nexus-experiment.xsd").read_text(encoding="utf-8").strip()
    assert (xsd["format"], xsd["dependencies"]) == ("XSD", [])
    alice.step("template, unknown id", "GET", "rest/template/987654321/", 404, message=True)
    spaces = alice.step("workspaces", "GET", "rest/workspace/read_access/", 200)
    public = next(w["id"] for w in spaces if w["is_public"])

    body = {"template": template, "title": title, "xml_content": xml}
    first = alice.step("create", "POST", "rest/data/", 201, json=body)
    assert (first["title"], first["xml_content"], first["workspace"]) == (title, xml, None)
    assert str(first["template"]) == str(template)
    second = alice.step("create, same title", "POST", "rest/data/", 201, json=body)
    assert second["id"] != first["id"]  # CDCS itself never refuses a duplicate

    query = {"title": title, "template": template, "page": "1"}
    page = alice.step("list by title", "GET", "rest/data/", 200, params=query)
    assert page["count"] == 2
    assert [r["id"] for r in page["results"]] == [second["id"], first["id"]]  # newest first
    assert page["next"] is None

    record = f"rest/data/{first['id']}/"
    assert alice.step("get", "GET", record, 200) == first
    patched = alice.step("patch content", "PATCH", record, 200, json={"xml_content": xml2})
    assert (patched["xml_content"], patched["title"]) == (xml2, title)
    page = alice.step("list after patch", "GET", "rest/data/", 200, params=query)
    assert [r["id"] for r in page["results"]] == [first["id"], second["id"]]  # by modification

    extra = [alice.call("POST", "rest/data/", json=body).json()["id"] for _ in range(EXTRA)]
    page = alice.step("list, page 1 of 2", "GET", "rest/data/", 200, params=query)
    assert (page["count"], len(page["results"])) == (2 + EXTRA, 10)
    assert page["next"].startswith(url)
    following = page["next"][len(url) :]
    assert following == f"rest/data/?page=2&template={template}&title={title}"  # sorted
    page = alice.step("list, page 2 of 2", "GET", following, 200)
    assert (len(page["results"]), page["next"]) == (1, None)
    assert page["previous"].startswith(url)
    assert page["previous"] == f"{url}rest/data/?template={template}&title={title}"  # no page=1
    alice.step(
        "list past the end", "GET", "rest/data/", 500, message=True, params=query | {"page": "3"}
    )
    for record_id in extra:
        assert alice.call("DELETE", f"rest/data/{record_id}/").status_code == 204

    assign = f"rest/data/{first['id']}/assign/{public}"
    alice.step("assign with trailing slash", "PATCH", assign + "/", 404)
    assert alice.step("assign", "PATCH", assign, 200) == {}
    assert alice.step("get after assign", "GET", record, 200)["workspace"] == public

    broken = "<Experiment><title>cut off"
    alice.step("patch, not well-formed", "PATCH", record, 500, json={"xml_content": broken})
    alice.step(
        "create, not well-formed", "POST", "rest/data/", 500, json=body | {"xml_content": broken}
    )
    # Not valid against the template: the same 500 as for a database outage, lxml's words.
    alice.step(
        "patch, not valid", "PATCH", record, 500, message=True, json={"xml_content": invalid}
    )
    alice.step(
        "create, not valid", "POST", "rest/data/", 500, message=True,
        json=body | {"xml_content": invalid},
    )  # fmt: skip
    alice.step(
        "create without title",
        "POST",
        "rest/data/",
        400,
        json={"template": template, "xml_content": xml},
    )
    alice.step(
        "create, unknown template", "POST", "rest/data/", 400, json=body | {"template": "987654321"}
    )

    bob.step("other user's list", "GET", "rest/data/", 200, params={"title": title})
    private = f"rest/data/{second['id']}/"
    bob.step("other user reads private", "GET", private, 403, message=True)
    assert bob.step("other user reads published", "GET", record, 200)["id"] == first["id"]
    bob.step(
        "other user patches published", "PATCH", record, 403, message=True, json={"title": "x"}
    )
    own = bob.step("other user creates", "POST", "rest/data/", 201, json=body)
    bob.step(
        "no right to publish", "PATCH", f"rest/data/{own['id']}/assign/{public}", 403, message=True
    )
    bob.step("other user deletes own", "DELETE", f"rest/data/{own['id']}/", 204)
    # Published in the one request: without the right, a 500 that creates nothing.
    bob.step(
        "create published, no right", "POST", "rest/data/", 500, message=True,
        json=body | {"workspace": public},
    )  # fmt: skip
    assert bob.step("own list after refusal", "GET", "rest/data/", 200, params=query)["count"] == 0
    published = alice.step(
        "create published", "POST", "rest/data/", 201, json=body | {"workspace": public}
    )
    assert published["workspace"] == public

    # The superuser's endpoints: users, every user's records, change-owner.
    users = admin.step("users", "GET", "rest/user/", 200)
    bob_id = next(u["id"] for u in users if u["username"] == "bob")
    alice.step("users, not an admin", "GET", "rest/user/", 403, message=True)
    alice.step("admin list, not an admin", "GET", "rest/admin/data/", 403, message=True)
    given = f"rest/data/{published['id']}/change-owner/{bob_id}"
    alice.step("change owner, not an admin", "PATCH", given, 403, message=True)
    admin.step("change owner, slash", "PATCH", given + "/", 404)
    admin.step(
        "change owner, no such user", "PATCH", f"rest/data/{published['id']}/change-owner/987654",
        500, message=True,
    )  # fmt: skip
    admin.step(
        "change owner, no such record", "PATCH", f"rest/data/987654321/change-owner/{bob_id}",
        404, message=True,
    )  # fmt: skip
    assert admin.step("change owner", "PATCH", given, 200) == {}
    moved = admin.step("get after change owner", "GET", f"rest/data/{published['id']}/", 200)
    assert (moved["user_id"], moved["workspace"]) == (str(bob_id), public)
    owned = alice.step("own list after change owner", "GET", "rest/data/", 200, params=query)
    assert published["id"] not in [r["id"] for r in owned["results"]]  # not hers any more
    alice.step(
        "patch given away", "PATCH", f"rest/data/{published['id']}/", 403, message=True,
        json={"xml_content": xml2},
    )  # fmt: skip
    everyone = admin.step(
        "admin list", "GET", "rest/admin/data/", 200, params={"title": title, "user": bob_id}
    )
    assert [r["id"] for r in everyone] == [published["id"]]
    assert admin.step("admin patch", "PATCH", f"rest/data/{published['id']}/", 200,
                      json={"xml_content": xml2})["user_id"] == str(bob_id)  # fmt: skip
    admin.step("admin deletes", "DELETE", f"rest/data/{published['id']}/", 204)

    alice.step("delete", "DELETE", private, 204)
    alice.step("get deleted", "GET", private, 404, message=True)
    alice.step("get unknown id", "GET", "rest/data/987654321/", 404, message=True)
    alice.step("get non-numeric id", "GET", "rest/data/abc/", 500, message=True)
    alice.step("bad token", "GET", "rest/data/", 403, message=True, token="0" * 40)
    alice.step("no token", "GET", "rest/data/", 403, message=True, token=None)
    alice.step("no token, record", "GET", record, 403, message=True, token=None)
    alice.step("no trailing slash, create", "POST", "rest/data", 301, json=body)
    alice.step("no trailing slash, record", "GET", record.rstrip("/"), 301)
    alice.step("no trailing slash, workspaces", "GET", "rest/workspace/read_access", 200)
    alice.step("unknown path", "GET", "rest/nothing/", 404)
    alice.step("method not allowed", "PUT", record, 405, message=True, json={})
    alice.step("delete published", "DELETE", record, 204)
    return alice.steps + bob.steps + admin.steps


@pytest.mark.cdcs
def test_fake_answers_like_the_real_cdcs(
    cdcs_server: CDCSServer, cdcs_fake: FakeCDCS, corpus: Path
) -> None:
    real = converse(
        cdcs_server.url,
        cdcs_server.user_token,
        cdcs_server.user_without_publish_right(),
        cdcs_server.admin_token,
        cdcs_server.template_title,
        corpus,
    )
    cdcs_fake.users[cdcs_fake.other_token].can_publish = False  # as the real server's bob
    cdcs_fake.validate_xml = True  # as the real server
    fake = converse(
        cdcs_fake.url,
        cdcs_fake.user_token,
        cdcs_fake.other_token,
        cdcs_fake.admin_token,
        cdcs_fake.template_title,
        corpus,
    )
    for real_step, fake_step in zip(real, fake, strict=True):
        assert fake_step == real_step


# -- what only the fake has ---------------------------------------------------------------


def _post(fake: FakeCDCS, title: str, token: str | None = None) -> requests.Response:
    body = {"template": fake.template_id, "title": title, "xml_content": "<Experiment/>"}
    return requests.post(
        fake.url + "rest/data/",
        json=body,
        headers={"Authorization": f"Token {token or fake.user_token}"},
        timeout=TIMEOUT,
    )


def test_fault_after_the_work_loses_only_the_reply(cdcs_fake: FakeCDCS) -> None:
    cdcs_fake.fail_next("POST", "rest/data/", 503, after=True)
    cdcs_fake.fail_next("GET", "rest/data/", 502)
    lost = _post(cdcs_fake, "s1")
    assert (lost.status_code, lost.headers["Retry-After"]) == (503, "0")
    assert len(cdcs_fake.records_titled("s1")) == 1  # made, though the client never heard
    listed = requests.get(
        cdcs_fake.url + "rest/data/",
        params={"title": "s1"},
        headers={"Authorization": f"Token {cdcs_fake.user_token}"},
        timeout=TIMEOUT,
    )
    assert listed.status_code == 502
    assert _post(cdcs_fake, "s1").status_code == 201
    assert cdcs_fake.title_counts()["s1"] == 2
    assert [r.status for r in cdcs_fake.calls("POST", "rest/data/")] == [503, 201]


def test_records_are_per_user(cdcs_fake: FakeCDCS) -> None:
    mine = _post(cdcs_fake, "s2").json()
    theirs = _post(cdcs_fake, "s2", cdcs_fake.other_token).json()
    assert (mine["user_id"], theirs["user_id"]) == ("2", "3")
    assert isinstance(mine["id"], int) and isinstance(mine["template"], int)
    listed = requests.get(
        cdcs_fake.url + "rest/data/",
        params={"title": "s2"},
        headers={"Authorization": f"Token {cdcs_fake.user_token}"},
        timeout=TIMEOUT,
    ).json()
    assert [r["id"] for r in listed["results"]] == [mine["id"]]
    assert [r["id"] for r in cdcs_fake.records_titled("s2")] == [mine["id"], theirs["id"]]
    assert cdcs_fake.record(theirs["id"])["user_id"] == "3"


def test_latency_lets_requests_overlap() -> None:
    fake, stop = start_fake_cdcs(latency=(0.3, 0.3))
    try:
        statuses: list[int] = []
        threads = [
            threading.Thread(target=lambda n=n: statuses.append(_post(fake, f"t{n}").status_code))
            for n in range(4)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=TIMEOUT)
        elapsed = time.monotonic() - started
    finally:
        stop()
    assert statuses == [201] * 4
    assert 0.3 <= elapsed < 1.0  # one after the other would take 1.2 s


def test_a_subprocess_reaches_the_fake(cdcs_fake: FakeCDCS) -> None:
    script = (
        "import sys, requests\n"
        "url, token, template = sys.argv[1:]\n"
        "r = requests.post(url + 'rest/data/', timeout=30, headers={'Authorization': "
        "'Token ' + token}, json={'template': template, 'title': 'sub', 'xml_content': '<a/>'})\n"
        "print(r.status_code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, cdcs_fake.url, cdcs_fake.user_token, cdcs_fake.template_id],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.strip() == "201", done.stderr
    assert cdcs_fake.title_counts()["sub"] == 1


def test_validation_follows_a_templates_includes(cdcs_fake: FakeCDCS) -> None:
    # What the real server here cannot do (no XSD_URI_RESOLVER): a template including another.
    cdcs_fake.validate_xml = True
    part = cdcs_fake.add_template(
        "part",
        content='<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">'
        '<xs:element name="n" type="xs:positiveInteger"/></xs:schema>',
        listed=False,
    )
    main = cdcs_fake.add_template(
        "main",
        content='<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">'
        '<xs:include schemaLocation="part.xsd"/></xs:schema>',
        dependencies={"part.xsd": part},
    )
    headers = {"Authorization": f"Token {cdcs_fake.user_token}"}

    def post(xml: str) -> requests.Response:
        body = {"template": main, "title": "inc", "xml_content": xml}
        return requests.post(
            cdcs_fake.url + "rest/data/", json=body, headers=headers, timeout=TIMEOUT
        )

    template = requests.get(
        f"{cdcs_fake.url}rest/template/{main}/", headers=headers, timeout=TIMEOUT
    ).json()
    assert template["dependencies"] == [int(part)]
    assert (
        f'schemaLocation="{cdcs_fake.server_uri}/rest/template/{part}/download/"'
        in (template["content"])
    )
    assert post("<n>3</n>").status_code == 201
    refused = post("<n>0</n>")
    assert refused.status_code == 500
    assert refused.json()["message"].startswith("Element 'n': '0' is not a valid value")


def test_a_user_added_can_be_given_records(cdcs_fake: FakeCDCS) -> None:
    user_id, token = cdcs_fake.add_user("carol")
    made = _post(cdcs_fake, "s3").json()
    admin = {"Authorization": f"Token {cdcs_fake.admin_token}"}

    given = requests.patch(
        f"{cdcs_fake.url}rest/data/{made['id']}/change-owner/{user_id}", headers=admin, timeout=30
    )
    listed = requests.get(
        cdcs_fake.url + "rest/admin/data/",
        params={"title": "s3", "user": user_id},
        headers=admin,
        timeout=TIMEOUT,
    ).json()
    users = requests.get(cdcs_fake.url + "rest/user/", headers=admin, timeout=TIMEOUT).json()

    assert given.status_code == 200
    assert [r["id"] for r in listed] == [made["id"]]
    assert "checksum" not in listed[0]  # AdminDataSerializer has none
    assert {"id": int(user_id), "username": "carol", "email": ""} in users
    assert cdcs_fake.users[token].username == "carol"
