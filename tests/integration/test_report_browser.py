"""The HTML report as a reader sees it: Chromium (Debian's, headless) opens the page and its
screenshot shows the figure, every panel's line in its colour, and the decisions."""

from __future__ import annotations

import shutil
import subprocess

from joule.report.draw import write
from tests.report_checks import DECISIONS, colours, not_blank, pixels_of
from tests.unit.test_report import sample_report


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is missing: `make host-packages` installs it (.ci/debian-packages)"
    return found


def test_a_browser_shows_the_report_page_with_every_panel(tmp_path):
    page = write(sample_report(), tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={shot}", "--window-size=1200,1700", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    assert not_blank(shot) > 0.02
    for colour in colours("power", "cap", "energy", "ready", "throughput", "limit"):
        assert pixels_of(shot, colour) > 100, colour
    assert pixels_of(shot, DECISIONS) > 100
