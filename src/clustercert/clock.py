"""Time as the product writes it: UTC, ISO-8601 to the second (``2026-12-02T08:00:00Z``).

Every timestamp in the store, in events and in API answers goes through :func:`iso`, and comes
back through :func:`parse_iso`; callers pass the moment in (clocks are injected), never read it
here except through :func:`utc_now`, the default clock.
"""

from __future__ import annotations

import datetime as dt

__all__ = ["iso", "parse_iso", "utc_now"]


def utc_now() -> dt.datetime:
    """The default clock: now, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


def iso(moment: dt.datetime) -> str:
    """``moment`` in UTC as ``YYYY-MM-DDTHH:MM:SSZ`` (a naive moment is taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> dt.datetime:
    """The aware moment an :func:`iso` string (or any ISO-8601 with an offset) names."""
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)
