"""The tier server's ready line: the one line on stdout that tells its parent it serves, and where.

``PDMESH_TIER_READY {"socket": ..., "http": "http://host:port", "segment": ..., "pid": ..., "transfer": ...}``

The server prints it once, after every listener is up; the worker launch, ``pdmesh up`` and the tests wait for it
in the server's log. This module is the only place that writes or reads it.
"""

from __future__ import annotations

import json
from typing import Any

READY_PREFIX = "PDMESH_TIER_READY "


def format_ready_line(info: dict[str, Any]) -> str:
    return READY_PREFIX + json.dumps(info)


def parse_ready_line(line: str) -> dict[str, Any] | None:
    """The info of a ready line, or None when ``line`` is not one (or is cut off)."""
    if not line.startswith(READY_PREFIX):
        return None
    try:
        info = json.loads(line[len(READY_PREFIX) :])
    except ValueError:
        return None
    return info if isinstance(info, dict) else None
