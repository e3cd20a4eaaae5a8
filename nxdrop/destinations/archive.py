"""The ``archive`` destination: a copy of each record in a folder tree (a NAS share, say).

Layout: ``<NX_ARCHIVE_PATH>/<instrument>/<YYYY>/<MM>/<session>.xml``, the date being the
record's start in its own time zone. Each copy is written under a temporary name, fsynced
and renamed into place, so a reader of the archive never sees half a record.

One session, one record: ``<session>.xml`` is always the latest version of the session's
record. New content for it replaces it, and the version it replaces is kept beside it as
``<session>.v1.xml``, ``<session>.v2.xml``, … (oldest first).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from nxdrop.destinations.base import ExportContext, ExportDestination, ExportResult
from nxdrop.exceptions import PermanentError
from nxdrop.fsops import fsync_dir, rename_noreplace, write_temporary
from nxdrop.settings import Settings

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_segment(value: str | None, fallback: str) -> str:
    """A path segment that cannot climb out of the archive or hide itself."""
    cleaned = _UNSAFE.sub("_", value or "").strip("._")
    return cleaned or fallback


class ArchiveDestination(ExportDestination):
    """Copies records into ``NX_ARCHIVE_PATH``; enabled when that is set."""

    name = "archive"
    priority = 50

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
        name = _safe_segment(context.session_identifier, "record") + ".xml"
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
    stem = path.name.removesuffix(".xml")
    n = 1
    while True:
        version = path.with_name(f"{stem}.v{n}.xml")
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
