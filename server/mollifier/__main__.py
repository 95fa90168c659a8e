"""``python -m mollifier`` is the ``mollifier`` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
