"""``python -m nxdrop`` is the ``nxdrop`` command."""

from __future__ import annotations

import sys

from nxdrop.cli import main

sys.exit(main())
