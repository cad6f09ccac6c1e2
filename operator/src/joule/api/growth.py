"""status.growingSince: when a job's target was raised above the workers running. Written
by both loops that raise a target (the policy's evaluation, a kubectl scale followed by the
lifecycle), read by the lifecycle to give up growth that cannot finish."""

from __future__ import annotations

import datetime as dt
from typing import Any

from joule.api.events import fmt_time


def mark_growth(st: dict[str, Any], before: int, after: int, now: dt.datetime) -> None:
    """A target raised above the workers running starts the clock of growth that may not
    finish (status.growingSince); a lowered one stops it."""
    if after > before:
        st.setdefault("growingSince", fmt_time(now))
    else:
        st.pop("growingSince", None)
