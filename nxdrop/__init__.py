"""nxdrop: publish NexusLIMS experiment records from a drop folder to CDCS, eLabFTW and plugins."""

from __future__ import annotations

__version__ = "0.1.0"
