"""The ``archive`` destination: a copy of each record in a folder tree (a NAS share, say).

Layout: ``<NX_ARCHIVE_PATH>/<instrument>/<YYYY>/<MM>/<session>.xml``, the date being the
record's start in its own time zone. Each copy is written under a temporary name, fsynced
and renamed into place, so a reader of the archive never sees half a record.

One session, one record: ``<session>.xml`` is always the latest version of the session's
record. New content for it replaces it, and the version it replaces is kept beside it as
``<session>.v1.xml``, ``<session>.v2.xml``, … (oldest first).

Names: letters and digits of any script, ``.``, ``-`` and ``_`` are kept; anything else
becomes ``_``, and a session whose name had to change that way gets ``~`` and 8 hex
digits of a hash of its identifier, so two sessions never share one file. Every name fits
in 255 bytes, versions and temporary names included (:func:`~nxdrop.fsops.fit_name`).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from nxdrop.destinations.base import ExportContext, ExportDestination, ExportResult
from nxdrop.exceptions import PermanentError
from nxdrop.fsops import (
    NAME_MAX,
    fit_name,
    fsync_dir,
    rename_noreplace,
    short_digest,
    write_temporary,
)
from nxdrop.settings import Settings

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# \w of a str pattern: letters and digits of every script, so 試料1 and 実験1 stay two names.
_UNSAFE_SESSION = re.compile(r"[^\w.-]+")
_XML = ".xml"
_VERSION = re.compile(r"\.v\d+$")
# A session's file name leaves room for its versions, ``.v<n>.xml``, up to n = 999999.
_STEM_MAX = NAME_MAX - len(".v999999.xml")


def _safe_segment(value: str | None, fallback: str) -> str:
    """A path segment that cannot climb out of the archive or hide itself."""
    cleaned = _UNSAFE.sub("_", value or "").strip("._")
    return fit_name(cleaned or fallback)


def _session_stem(session: str) -> str:
    """The stem of a session's file: its identifier, made safe and unique, and short enough."""
    cleaned = _UNSAFE_SESSION.sub("_", session).strip("._") or "record"
    # A session named like a version of another (``x.v1``) is marked too: ``x.v1.xml`` is
    # session ``x``'s first version.
    if cleaned != session or _VERSION.search(cleaned):
        cleaned = f"{cleaned}~{short_digest(session)}"
    return fit_name(cleaned, limit=_STEM_MAX)


class ArchiveDestination(ExportDestination):
    """Copies records into ``NX_ARCHIVE_PATH``; enabled when that is set."""

    name = "archive"
    priority = 50
    reads = frozenset()  # needs no other destination: runs beside them

    def __init__(self) -> None:
        self.root: Path | None = None

    def configure(self, settings: Settings) -> None:
        """Take ``NX_ARCHIVE_PATH`` from the settings."""
        self.root = settings.archive_path

    @property
    def enabled(self) -> bool:
        """On when ``NX_ARCHIVE_PATH`` is set."""
        return self.root is not None

    @property
    def disabled_reason(self) -> str:
        """Why it is off, for ``nxdrop destinations``."""
        return "NX_ARCHIVE_PATH is not set"

    @property
    def endpoint(self) -> str:
        """The archive folder, absolute."""
        return str(self.root.absolute()) if self.root is not None else ""

    def validate_config(self) -> tuple[bool, str | None]:
        """The archive folder exists (or can be made) and this user may write in it."""
        if self.root is None:
            return False, self.disabled_reason
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return False, f"NX_ARCHIVE_PATH={self.root}: cannot create: {exc.strerror}"
        if not os.access(self.root, os.W_OK | os.X_OK):
            return False, f"NX_ARCHIVE_PATH={self.root}: not writable by this user"
        return True, None

    def path_for(self, context: ExportContext) -> Path:
        """``<root>/<instrument>/<YYYY>/<MM>/<session>.xml`` for this record."""
        assert self.root is not None
        when = context.dt_from
        year, month = (f"{when.year:04d}", f"{when.month:02d}") if when else ("undated", "00")
        instrument = _safe_segment(context.instrument_pid, "unknown-instrument")
        name = _session_stem(context.session_identifier) + _XML
        return self.root / instrument / year / month / name

    def export(self, context: ExportContext) -> ExportResult:
        """Write the session's copy; the same bytes already there are reused, never rewritten,
        and other bytes there (an earlier version of this session) are kept as a version."""
        target = self.path_for(context)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._write(target, context.content, context.sha256)
        except OSError as exc:
            raise PermanentError(f"archive {target.parent}: {exc.strerror or exc}") from exc
        return self._result(target, context.sha256)

    def update(self, context: ExportContext, previous: ExportResult) -> ExportResult:
        """Replace the session's copy; one that moved (new instrument or month) is kept as a
        version where it was."""
        assert self.root is not None
        target = self.path_for(context)
        old = self.root / previous.record_id if previous.record_id else None
        if old is not None and old != target and old.is_file():
            try:
                _keep_version(old)
                old.unlink()
            except OSError as exc:
                raise PermanentError(f"archive {old}: {exc.strerror or exc}") from exc
        return self.export(context)

    def reconcile(self, context: ExportContext, earlier: ExportResult) -> ExportResult:
        """The same bytes again: reused if the copy ``earlier`` made still holds them, else
        written again (someone removed or changed it)."""
        assert self.root is not None
        copy = self.root / earlier.record_id if earlier.record_id else None
        if copy is not None and _sha256_of(copy) == context.sha256:
            return earlier
        return self.export(context)

    def _write(self, target: Path, content: bytes, digest: str) -> None:
        if _sha256_of(target) == digest:
            return  # already there: an identical copy is never rewritten
        tmp = write_temporary(target.parent, target.name, content)
        try:
            try:
                rename_noreplace(tmp, target)
            except FileExistsError:
                if _sha256_of(target) == digest:
                    return  # another worker just wrote the same bytes
                _keep_version(target)
                os.replace(tmp, target)
            fsync_dir(target.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def _result(self, target: Path, digest: str) -> ExportResult:
        assert self.root is not None
        return ExportResult(
            success=True,
            destination_name=self.name,
            record_id=target.relative_to(self.root).as_posix(),
            record_url=target.absolute().as_uri(),
            metadata={"sha256": digest, "path": str(target)},
        )


def _keep_version(path: Path) -> Path:
    """Keep the file at ``path`` as its next ``.v<n>.xml`` version (unless already kept)."""
    digest = _sha256_of(path)
    stem = path.name.removesuffix(_XML)
    n = 1
    while True:
        version = path.with_name(fit_name(stem, f".v{n}{_XML}"))
        if not version.exists():
            break
        if _sha256_of(version) == digest:
            return version  # kept by an attempt that stopped before replacing
        n += 1
    try:
        os.link(path, version)  # no copy, and never over an existing name
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some SMB shares): a copy
        tmp = write_temporary(path.parent, version.name, path.read_bytes())
        try:
            rename_noreplace(tmp, version)
        finally:
            tmp.unlink(missing_ok=True)
    return version


def _sha256_of(path: Path) -> str | None:
    """The SHA-256 of the file at ``path``, or ``None`` if there is none."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()
