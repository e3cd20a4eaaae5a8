"""The ``archive`` destination: a copy of each record in a folder tree (a NAS share, say).

Layout: ``<NX_ARCHIVE_PATH>/<instrument>/<YYYY>/<MM>/<session>.xml``, the date being the
record's start in its own time zone. Each copy is written under a temporary name, fsynced
and renamed into place, so a reader of the archive never sees half a record.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from nxdrop.destinations.base import ExportContext, ExportResult
from nxdrop.exceptions import PermanentError
from nxdrop.folders import rename_noreplace, unique_names
from nxdrop.settings import Settings

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_segment(value: str | None, fallback: str) -> str:
    """A path segment that cannot climb out of the archive or hide itself."""
    cleaned = _UNSAFE.sub("_", value or "").strip("._")
    return cleaned or fallback


class ArchiveDestination:
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

    def folder_for(self, context: ExportContext) -> Path:
        """``<root>/<instrument>/<YYYY>/<MM>`` for this record."""
        assert self.root is not None
        when = context.dt_from
        year, month = (f"{when.year:04d}", f"{when.month:02d}") if when else ("undated", "00")
        instrument = _safe_segment(context.instrument_pid, "unknown-instrument")
        return self.root / instrument / year / month

    def export(self, context: ExportContext) -> ExportResult:
        """Copy the record; an identical copy already there is reused, never rewritten."""
        assert self.root is not None
        content = context.content
        digest = hashlib.sha256(content).hexdigest()
        folder = self.folder_for(context)
        name = _safe_segment(context.session_identifier, "record") + ".xml"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            target = self._existing_copy(folder, name, digest) or self._write(
                folder, name, content, digest
            )
        except OSError as exc:
            raise PermanentError(f"archive {folder}: {exc.strerror or exc}") from exc
        return ExportResult(
            success=True,
            destination_name=self.name,
            record_id=target.relative_to(self.root).as_posix(),
            record_url=target.absolute().as_uri(),
            metadata={"sha256": digest, "path": str(target)},
        )

    def _existing_copy(self, folder: Path, name: str, digest: str) -> Path | None:
        for candidate in unique_names(folder, name):
            if not candidate.is_file():
                return None
            if _sha256_of(candidate) == digest:
                return candidate
        return None  # pragma: no cover - unique_names is endless

    def _write(self, folder: Path, name: str, content: bytes, digest: str) -> Path:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            for target in unique_names(folder, name):
                try:
                    rename_noreplace(tmp, target)
                except FileExistsError:
                    # Someone else (another worker, another daemon) just wrote the same bytes.
                    if _sha256_of(target) == digest:
                        return target
                    continue
                _fsync_dir(folder)
                return target
        finally:
            tmp.unlink(missing_ok=True)
        raise AssertionError("unreachable: unique_names is endless")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
