"""RFC 3339 timestamps as Kubernetes writes them (seconds, `Z` suffix) <-> epoch seconds."""

from __future__ import annotations

import datetime as dt
import functools

# 2026-11-22T21:59:03.123456789+01:00 is 35 characters.
_MAX_TIMESTAMP_LENGTH = 64


def format_time(epoch: float) -> str:
    """`2026-11-22T21:59:03Z` for an epoch time (truncated to the second, as metav1.Time)."""
    return _format_second(int(epoch))


@functools.lru_cache(maxsize=256)  # a reconcile formats the same few seconds many times over
def _format_second(second: int) -> str:
    return dt.datetime.fromtimestamp(second, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: object) -> float | None:
    """Epoch seconds for an RFC 3339 string, or None if absent or unreadable (or longer than any timestamp: these
    come from annotations on Secrets that namespace users may edit, so the work stays bounded)."""
    if not isinstance(value, str) or not value or len(value) > _MAX_TIMESTAMP_LENGTH:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()
