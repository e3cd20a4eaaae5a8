"""A thin client of eLabFTW's REST API v2: the calls nxdrop makes, and the server's version.

Each method is one request through :class:`~nxdrop.http.HttpClient` (which classifies every
failure and scrubs the API key from every message); nothing here decides what to do.

Where the real server differs from its spec (shared/peers/elabftw/README.md, and eLabFTW's
PHP): ``Authorization: <key>`` without a scheme; ``POST`` answers ``201`` with an empty
body and a ``Location`` whose host may not be ours; a ``PATCH`` value is cast to a string
(src/controllers/Apiv2Controller.php → AbstractEntity::patch, Action::Update), so
``metadata`` and ``metadatamerge`` go as JSON strings.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from nxdrop.exceptions import PermanentError
from nxdrop.http.bodies import multipart_body
from nxdrop.http.lazy import LazyClient

if TYPE_CHECKING:
    from nxdrop.http.client import HttpClient

ARCHIVED = 2  # experiments.state: 1 normal, 2 archived, 3 deleted (src/enums/State.php)


@dataclass(frozen=True, order=True)
class Version:
    """An eLabFTW release, as ``GET api/v2/info`` tells it (src/models/Info.php)."""

    major: int
    minor: int
    patch: int = 0

    @classmethod
    def of(cls, info: Any) -> Version | None:
        """The version in an ``info`` answer: ``elabftw_version`` ("5.6.1"), else
        ``elabftw_version_int`` (50601: major, then minor and patch on two digits each,
        src/classes/App.php INSTALLED_VERSION_INT)."""
        if not isinstance(info, dict):
            return None
        text = info.get("elabftw_version")
        found = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", text) if isinstance(text, str) else None
        if found is not None:
            return cls(int(found[1]), int(found[2]), int(found[3] or 0))
        number = info.get("elabftw_version_int")
        if isinstance(number, int) and not isinstance(number, bool) and number >= 10000:
            return cls(number // 10000, number // 100 % 100, number % 100)
        return None

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


# What each release can do, as far as nxdrop depends on it.
#: 5.0 and 5.1 ignore ``body`` and ``metadata`` on create: the SHA-256 would never be
#: stored, nxdrop could not find its experiment again, and every retry would make another.
MINIMUM = Version(5, 2)
#: ``content_type`` on create is honoured (before, the key's user preference decides).
CONTENT_TYPE_ON_CREATE = Version(5, 4)
#: The extended search finds an exact extra field: ``extrafield:"SHA-256":<sha>``
#: (src/node/grammar/queryGrammar.pegjs FieldMetadata; QueryBuilderVisitor::visitMetadataField).
EXTENDED_SEARCH = Version(5, 4)
#: ``PATCH {"metadatamerge": …}`` merges extra fields in (src/Elabftw/MetadataHelpers.php).
METADATA_MERGE = Version(5, 6)

WHY_MINIMUM = (
    "nxdrop needs eLabFTW 5.2 or newer: 5.0 and 5.1 ignore the body and extra fields of a new "
    "experiment, so nxdrop could not recognise its own experiment and every retry would make "
    "another"
)


class ELabFTWApi:
    """The API calls of the eLabFTW destination, and the server's version (read once)."""

    def __init__(self, client: LazyClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._version: Version | None = None

    @property
    def http(self) -> HttpClient:
        """The client, made at the first request."""
        return self._client.client

    # -- the server --------------------------------------------------------------------

    def version(self) -> Version:
        """The server's version (``GET info``, read once it is known).

        A :class:`PermanentError` if it is older than :data:`MINIMUM` or cannot be told;
        only a version read is remembered, so a server that failed to answer is asked again.
        """
        with self._lock:
            if self._version is None:
                try:
                    info = self.http.json("GET", "info")
                except PermanentError as exc:
                    raise PermanentError(
                        f"cannot read the eLabFTW version (5.2 or newer is needed): {exc}",
                        status_code=exc.status_code,
                    ) from exc
                found = Version.of(info)
                if found is None:
                    raise PermanentError(
                        f"GET {self.http.url('info')} does not tell the eLabFTW version "
                        f"(is this eLabFTW?); {WHY_MINIMUM}"
                    )
                self._version = found
            if self._version < MINIMUM:
                raise PermanentError(
                    f"eLabFTW {self._version} at {self.http.url('')} is not supported: "
                    f"{WHY_MINIMUM}; upgrade eLabFTW"
                )
            return self._version

    def me(self) -> dict[str, Any]:
        """The API key's user (``GET users/me``): a check that the key works, and its team."""
        found = self.http.json("GET", "users/me")
        return found if isinstance(found, dict) else {}

    def entries(self, team: int, kind: str, limit: int) -> list[dict[str, Any]]:
        """A team's ``experiments_categories`` or ``experiments_status``."""
        found = self.http.json("GET", f"teams/{team}/{kind}", params={"limit": limit})
        return [e for e in found if isinstance(e, dict)] if isinstance(found, list) else []

    # -- experiments -------------------------------------------------------------------

    def search(
        self,
        *,
        limit: int,
        q: str | None = None,
        extended: str | None = None,
        tag: str | None = None,
    ) -> list[dict[str, Any]]:
        """Experiments matching a text search (``q``), an extended one, or with ``tag``,
        archived included.

        The list shows the normal state only unless told (src/Params/BaseQueryParams.php:
        ``?state=1,2`` for normal and archived). An older BaseQueryParams reads
        ``archived`` (any value) instead; which release changed it is not pinned down, so
        servers older than 5.4 get both and ignore the one they do not know.
        """
        params: dict[str, Any] = {"limit": limit, "state": "1,2"}
        if q is not None:
            params["q"] = q
        if extended is not None:
            params["extended"] = extended
        if tag is not None:
            params["tags[]"] = tag
        if self.version() < EXTENDED_SEARCH:
            params["archived"] = "on"
        found = self.http.json("GET", "experiments", params=params)
        found = found if isinstance(found, list) else []
        return [h for h in found if isinstance(h, dict) and isinstance(h.get("id"), int)]

    def read(self, experiment_id: int) -> dict[str, Any] | None:
        """The experiment in full (with its uploads); ``None`` if it is not there for us."""
        try:
            experiment = self.http.json("GET", f"experiments/{experiment_id}")
        except PermanentError as exc:
            # 404: no such id. 403: deleted (eLabFTW keeps a deleted experiment but refuses
            # to show it) or not readable with this key. Not ours to change either way.
            if exc.status_code in (403, 404):
                return None
            raise
        if not isinstance(experiment, dict):
            raise PermanentError(f"GET experiments/{experiment_id}: not an experiment")
        return dict(experiment, id=experiment_id)

    def create(self, payload: dict[str, Any]) -> int:
        """Create an experiment; its id, from the ``Location`` of the empty ``201``."""
        reply = self.http.request("POST", "experiments", json=payload)
        return self.id_from_location(reply.headers.get("Location"), "POST experiments")

    def upload(self, experiment_id: int, name: str, content: bytes, sha: str) -> int | None:
        """Attach a record: its bytes are sent as they are, never copied into one body."""
        body = multipart_body(
            {"comment": "NexusLIMS XML record"},  # NexusLIMS's comment
            "file",
            name,
            content,
            "application/xml",
            # A fixed boundary: a retried upload sends the same bytes as the first.
            boundary=f"nxdrop{sha[:32]}",
        )
        reply = self.http.request("POST", f"experiments/{experiment_id}/uploads", data=body)
        location = reply.headers.get("Location")
        return self.id_from_location(location, "POST uploads") if location else None

    def add_tag(self, experiment_id: int, tag: str) -> None:
        """Link one tag (one per request: a refused tag stops the ones after it)."""
        self.http.request("POST", f"experiments/{experiment_id}/tags", json={"tag": tag})

    def patch(self, experiment_id: int, changes: dict[str, Any]) -> None:
        """Change an experiment (Action::Update): the server applies the keys in order."""
        self.http.request("PATCH", f"experiments/{experiment_id}", json=changes)

    def id_from_location(self, location: str | None, what: str) -> int:
        """The new id: the last path segment of ``Location`` (its host may not be ours)."""
        segment = urlsplit(location or "").path.rstrip("/").rpartition("/")[2]
        if not segment.isdigit():
            shown = self.http.redactor.cut(location or "", 200)
            raise PermanentError(f"{what}: no id in the Location header ({shown!r})")
        return int(segment)
