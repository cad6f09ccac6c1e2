"""The per-GPU power limit the operator asks for. It arrives as a file that the kubelet keeps
in step with the pod's ``joule.dev/gpu-power-limit-watts`` annotation (a downwardAPI volume),
so a running trainer follows it without a restart. Empty or absent: the device's default."""

from __future__ import annotations

import time
from pathlib import Path

CHECK_EVERY_S = 1.0


def parse_limit(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    watts = float(text)
    if watts <= 0:
        raise ValueError(f"a power limit must be > 0 W, got {text!r}")
    return watts


class LimitFile:
    """Polls the file at most once per ``every_s``; ``changed()`` says when to apply."""

    def __init__(self, path: str | None, every_s: float = CHECK_EVERY_S) -> None:
        self.path = Path(path) if path else None
        self.every_s = every_s
        self._next = 0.0
        self.current: float | None = None

    def changed(self) -> bool:
        if self.path is None or time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + self.every_s
        try:
            watts = parse_limit(self.path.read_text())
        except (OSError, ValueError):
            watts = None  # absent or unreadable: the default, as without an annotation
        if watts == self.current:
            return False
        self.current = watts
        return True
