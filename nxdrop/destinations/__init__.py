"""Destinations: where records go. Import the interface from here in a plugin::

from nxdrop.destinations import ExportContext, ExportResult

``AcquisitionActivity`` and ``Dataset`` are the types of ``context.activities`` and of an
activity's ``datasets``, for a plugin's type hints.
"""

from __future__ import annotations

from nxdrop.activities import AcquisitionActivity, Dataset
from nxdrop.destinations.base import ExportContext, ExportDestination, ExportResult, utcnow

__all__ = [
    "AcquisitionActivity",
    "Dataset",
    "ExportContext",
    "ExportDestination",
    "ExportResult",
    "utcnow",
]
