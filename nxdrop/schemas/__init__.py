"""The XML schemas shipped with nxdrop.

``nexus-experiment.xsd`` is the NexusLIMS experiment schema (from ``nexuslims`` 2.8.0,
``nexusLIMS/schemas/``; it imports no other schema): every record is checked against it
unless ``NX_SCHEMA_PATH`` names another file, or is ``none``.
"""

from __future__ import annotations

from pathlib import Path

NEXUS_EXPERIMENT_XSD = Path(__file__).resolve().with_name("nexus-experiment.xsd")
