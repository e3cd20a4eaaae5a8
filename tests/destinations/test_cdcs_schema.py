"""The template check before a record is sent: includes and imports of other CDCS templates,
templates that cannot be checked here, safe parsing, and records too large for a tree.

Templates with includes run against the fake CDCS: the real one in shared/peers/cdcs has no
``XSD_URI_RESOLVER``, so its lxml cannot load an included template's download URL and CDCS
refuses to store such a template at all ("Failed to load the document …/rest/template/3/
download/ for inclusion"). The fake stores them as CDCS does (the ``schemaLocation``
rewritten to the download URL, the template listed in ``dependencies``) and validates as a
CDCS whose resolver reaches its own templates.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nxdrop.destinations import cdcs_schema
from nxdrop.destinations.base import ExportContext
from nxdrop.destinations.cdcs import CDCSDestination
from nxdrop.destinations.cdcs_schema import TemplateSchemas, TemplateViolation
from nxdrop.exceptions import PermanentError, RecordError, TransientError
from nxdrop.reader import TREE_MAX, RecordReader
from nxdrop.settings import Settings
from tests.conftest import RECORDS
from tests.fixtures.cdcs_fake import FakeCDCS

MakeSettings = Callable[..., Settings]

TYPES = """<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" targetNamespace="urn:nx:types"
    xmlns:t="urn:nx:types">
  <xs:simpleType name="Code">
    <xs:restriction base="xs:string"><xs:pattern value="[A-Z]{3}"/></xs:restriction>
  </xs:simpleType>
</xs:schema>"""
PART = """<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <xs:element name="count" type="xs:positiveInteger"/>
</xs:schema>"""
MAIN = """<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" xmlns:t="urn:nx:types">
  <xs:import namespace="urn:nx:types" schemaLocation="types.xsd"/>
  <xs:include schemaLocation="part.xsd"/>
  <xs:element name="Experiment">
    <xs:complexType><xs:sequence>
      <xs:element ref="count"/><xs:element name="code" type="t:Code"/>
    </xs:sequence></xs:complexType>
  </xs:element>
</xs:schema>"""


def record(tmp_path: Path, body: str) -> ExportContext:
    session = f"2024-03-03_test_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{session}.xml"
    path.write_text(f"<Experiment>{body}</Experiment>", encoding="utf-8")
    return ExportContext(
        xml_file_path=path,
        session_identifier=session,
        instrument_pid=None,
        user=None,
        dt_from=None,
        dt_to=None,
    )


@pytest.fixture
def included(cdcs_fake: FakeCDCS) -> str:
    """A template that imports one template and includes another; its title."""
    cdcs_fake.validate_xml = True
    types = cdcs_fake.add_template("types", content=TYPES, listed=False)
    part = cdcs_fake.add_template("part", content=PART, listed=False)
    title = "Included Experiment"
    cdcs_fake.add_template(title, content=MAIN, dependencies={"types.xsd": types, "part.xsd": part})
    return title


@pytest.fixture
def destination(make_settings: MakeSettings, cdcs_fake: FakeCDCS) -> Callable[..., CDCSDestination]:
    def make(**overrides: Any) -> CDCSDestination:
        values = {"cdcs_url": cdcs_fake.url, "cdcs_token": cdcs_fake.user_token}
        dest = CDCSDestination()
        dest.configure(make_settings(**{**values, **overrides}))
        return dest

    return make


def test_the_fake_stores_includes_as_cdcs_does(cdcs_fake: FakeCDCS, included: str) -> None:
    main = cdcs_fake.template_docs[max(cdcs_fake.template_docs)]
    assert f"{cdcs_fake.server_uri}/rest/template/" in main["content"]
    assert "types.xsd" not in main["content"]
    assert len(main["dependencies"]) == 2


def test_records_are_checked_against_included_and_imported_templates(
    destination: Callable[..., CDCSDestination],
    cdcs_fake: FakeCDCS,
    included: str,
    tmp_path: Path,
) -> None:
    dest = destination(cdcs_template=included)

    made = dest.export(record(tmp_path, "<count>3</count><code>ABC</code>"))
    with pytest.raises(PermanentError, match="not accepted by the pattern") as imported:
        dest.export(record(tmp_path, "<count>3</count><code>abc</code>"))
    with pytest.raises(PermanentError, match="not a valid value") as from_include:
        dest.export(record(tmp_path, "<count>0</count><code>ABC</code>"))

    assert made.success
    assert "refuses the record, so it was not sent" in str(imported.value)
    assert "'count'" in str(from_include.value)
    assert len(cdcs_fake.calls("POST", "rest/data/")) == 1  # only the valid one was sent
    # The template and the two it names, each fetched once.
    assert len(cdcs_fake.calls("GET", r"rest/template/\d+/")) == 3


def test_an_include_that_is_no_cdcs_template_leaves_the_check_to_cdcs(
    destination: Callable[..., CDCSDestination],
    cdcs_fake: FakeCDCS,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # schemaLocations that CDCS did not rewrite: a file beside the XSD, a local path.
    content = MAIN.replace("types.xsd", "file:///etc/passwd")
    template = cdcs_fake.add_template("Outside", content=content)
    dest = destination(cdcs_template="Outside")

    with caplog.at_level(logging.WARNING, logger="nxdrop.destinations.cdcs"):
        sent = dest.export(record(tmp_path, "<anything/>"))
    cdcs_fake.fail_next("POST", "rest/data/", 500)
    with pytest.raises(TransientError) as caught:
        dest.export(record(tmp_path, "<anything/>"))

    assert sent.success  # sent unchecked: CDCS checks it (here the fake does not)
    assert f"CDCS template {template}: records cannot be checked here" in caplog.text
    assert "'file:///etc/passwd'" in caplog.text
    assert "nxdrop fetches nothing else" in caplog.text
    message = str(caught.value)
    assert f"could not be checked against template {template} here" in message
    assert "retried" in message


def test_no_entity_of_a_template_is_expanded(
    destination: Callable[..., CDCSDestination],
    cdcs_fake: FakeCDCS,
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("S3CRET-MARKER", encoding="utf-8")
    hostile = f"""<!DOCTYPE xs:schema [<!ENTITY e SYSTEM "file://{secret}">]>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <xs:element name="Experiment">
    <xs:annotation><xs:documentation>&e;</xs:documentation></xs:annotation>
    <xs:simpleType><xs:restriction base="xs:string">
      <xs:enumeration value="ok"/>
    </xs:restriction></xs:simpleType>
  </xs:element>
</xs:schema>"""
    cdcs_fake.add_template("Hostile", content=hostile)

    with pytest.raises(PermanentError) as caught:
        destination(cdcs_template="Hostile").export(record(tmp_path, "not ok"))

    assert "not an element of the set" in str(caught.value)
    assert "S3CRET-MARKER" not in str(caught.value)
    assert cdcs_fake.calls("POST", "rest/data/") == []


# -- records too large for a tree ------------------------------------------------------

MiB = 1024 * 1024


def padded(content: bytes, size: int) -> bytes:
    """``content`` with comments after its first line, to about ``size`` bytes."""
    head, rest = content.split(b"\n", 1)
    comment = b"<!-- " + b"padding " * (MiB // 8) + b"-->\n"
    return head + b"\n" + comment * (size // len(comment) + 1) + rest


@pytest.fixture
def nexus(corpus: Path) -> TemplateSchemas:
    """The check with the NexusLIMS XSD, as CDCS serves it, without a server."""
    xsd = (corpus / "nexus-experiment.xsd").read_text(encoding="utf-8")
    return TemplateSchemas(lambda _id: {"content": xsd, "format": "XSD", "dependencies": []})


def test_a_record_larger_than_a_tree_is_checked_as_a_stream(
    nexus: TemplateSchemas, corpus: Path
) -> None:
    content = (corpus / RECORDS[1]).read_bytes()
    big = padded(content, TREE_MAX + MiB)
    bad = content.replace(b"<project>", b"<bogus/><project>", 1)

    with pytest.raises(TemplateViolation) as small_error:
        nexus.check("1", bad)
    with pytest.raises(TemplateViolation) as big_error:
        nexus.check("1", padded(bad, TREE_MAX + MiB))
    with pytest.raises(TemplateViolation, match="not well-formed"):
        nexus.check("1", big[: len(big) - 40])  # cut off inside the last element

    assert len(big) > TREE_MAX
    assert nexus.check("1", big) is None
    # The same words either way; only the line differs (the padding added lines).
    assert (
        str(big_error.value).rsplit(", line", 1)[0] == str(small_error.value).rsplit(", line", 1)[0]
    )


# -- a record that passed the template's own XSD is not validated twice --------------------

CODES = """<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <xs:element name="Experiment">
    <xs:complexType><xs:sequence>
      <xs:element name="code" maxOccurs="unbounded">
        <xs:simpleType>
          <xs:restriction base="xs:string"><xs:pattern value="[A-Z]{3}"/></xs:restriction>
        </xs:simpleType>
      </xs:element>
    </xs:sequence></xs:complexType>
  </xs:element>
</xs:schema>"""


def served(xsd: str) -> TemplateSchemas:
    """The check of a template with ``xsd``, as CDCS serves it, without a server."""
    return TemplateSchemas(lambda _id: {"content": xsd, "format": "XSD", "dependencies": []})


def verdict(check: Callable[[], object]) -> str:
    try:
        check()
    except (RecordError, TemplateViolation) as exc:
        return f"refused: {exc}"
    return "valid"


@pytest.mark.parametrize(
    "body",
    [
        "<code>ABC</code>",
        "<code> ABC</code>",  # a string keeps its spaces: refused either way
        "\n  <code>ABC</code>\n  <code>XYZ</code>\n",  # blanks between elements: ignored
        "<code>  <![CDATA[ABC]]></code>",  # blanks CDCS's parser drops: valid to CDCS
        "<code><![CDATA[ABC]]>\n</code>",
        "<code>  </code>",  # blanks alone are kept
        "<code>AB<!-- c -->C</code>",  # comments and PIs: CDCS keeps them, the reader not
        "<code>  <!-- c --></code>",
        "<code>AB<?pi x?>C</code>",
    ],
)
def test_a_record_that_passed_the_same_xsd_gets_cdcss_verdict(tmp_path: Path, body: str) -> None:
    xsd = tmp_path / "codes.xsd"
    xsd.write_text(CODES, encoding="utf-8")
    content = f'<?xml version="1.0"?>\n<!-- mine -->\n<Experiment>{body}</Experiment>'.encode()
    path = tmp_path / "2024-03-03_test_1.xml"
    path.write_bytes(content)

    def nxdrop() -> None:  # the reader with the template's XSD, then the check it allows
        record = RecordReader(10**6, xsd).read(path)
        served(CODES).check("1", content, record.valid_against)

    assert verdict(nxdrop).startswith("valid") is verdict(
        lambda: served(CODES).check("1", content)
    ).startswith("valid")


def test_the_check_is_skipped_only_for_the_very_xsd_the_record_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xsd = tmp_path / "codes.xsd"
    xsd.write_text(CODES, encoding="utf-8")
    path = tmp_path / "2024-03-03_test_1.xml"
    path.write_bytes(b"<Experiment><code>ABC</code></Experiment>")
    record = RecordReader(10**6, xsd).read(path)
    assert record.valid_against == CODES.encode()
    stricter = CODES.replace("[A-Z]{3}", "[A-Z]{2}")

    with pytest.raises(TemplateViolation, match="pattern"):  # another XSD: checked
        served(stricter).check("1", record.content, record.valid_against)
    with pytest.raises(TemplateViolation, match="pattern"):  # nothing known: checked
        served(stricter).check("1", record.content)
    validated: list[bytes] = []
    monkeypatch.setattr(cdcs_schema, "_validate", lambda s, content, p: validated.append(content))
    assert served(CODES).check("1", record.content, record.valid_against) is None
    assert validated == []  # the same XSD: its verdict is known
    assert served(CODES).check("1", record.content) is None
    assert validated == [record.content]


def test_a_record_not_read_as_cdcs_reads_it_is_checked(tmp_path: Path) -> None:
    xsd = tmp_path / "codes.xsd"
    xsd.write_text(CODES, encoding="utf-8")
    path = tmp_path / "2024-03-03_test_1.xml"
    path.write_bytes(b"<Experiment><code>AB<!-- c -->C</code></Experiment>")
    assert RecordReader(10**6, xsd).read(path).valid_against is None  # a comment inside
    assert RecordReader(10**6, xsd, tree_max=0).read(path).valid_against is None  # streamed
    assert RecordReader(10**6, None).read(path).valid_against is None  # no schema
