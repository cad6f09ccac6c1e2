"""Checks on a drawn report that a reader would make by eye: the page is not blank, and each
panel shows its lines in their colours (or says it has no data)."""

from __future__ import annotations

from pathlib import Path

from joule.report.draw import COLOURS, DECISION_COLOUR


def _rgb(colour: str) -> tuple[float, float, float]:
    return tuple(int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))  # type: ignore[return-value]


def pixels_of(png: Path, colour: str, box: tuple[int, int, int, int] | None = None) -> int:
    """How many pixels of ``png`` (inside ``box``: left, top, right, bottom) are ``colour``."""
    import matplotlib.image
    import numpy as np

    image = matplotlib.image.imread(png)[..., :3]
    if box is not None:
        left, top, right, bottom = box
        image = image[top:bottom, left:right]
    return int((np.abs(image - np.array(_rgb(colour))).max(axis=-1) < 0.06).sum())


def not_blank(png: Path) -> float:
    """The share of pixels that are not the most common colour (the background)."""
    import matplotlib.image
    import numpy as np

    image = (matplotlib.image.imread(png)[..., :3] * 255).astype(int)
    flat = image.reshape(-1, 3)
    _, counts = np.unique(flat, axis=0, return_counts=True)
    return 1.0 - counts.max() / len(flat)


def colours(*names: str) -> list[str]:
    return [COLOURS[n] for n in names]


DECISIONS = DECISION_COLOUR
