"""Destinations: where records go. Import the interface from here in a plugin::

from nxdrop.destinations import ExportContext, ExportResult
"""

from __future__ import annotations

from nxdrop.destinations.base import ExportContext, ExportDestination, ExportResult, utcnow

__all__ = ["ExportContext", "ExportDestination", "ExportResult", "utcnow"]
