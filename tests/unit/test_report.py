"""`joule report`: the pure steps (decisions from counters and Events, the status' window as
lines, --since) and the drawn page (every panel where it says, its lines in their colours)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from joule.cli import main
from joule.report.draw import PANELS_KEY, write
from joule.report.model import (
    PANELS,
    Line,
    Report,
    decisions_from_counters,
    decisions_from_events,
    matrix_line,
    parse_since,
    status_panels,
)
from tests.report_checks import DECISIONS, colours, not_blank, pixels_of


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("1h", 3600), ("2h30m", 9000), ("1d", 86400)]
)
def test_since_reads_durations(text, seconds):
    assert parse_since(text) == seconds


@pytest.mark.parametrize("text", ["", "1x", "h", "0s", "-5m", "1.5h"])
def test_since_refuses_what_is_not_a_duration(text):
    with pytest.raises(ValueError, match="--since"):
        parse_since(text)


def series(reason: str, points: list[tuple[float, float]]) -> dict:
    return {"metric": {"reason": reason}, "values": [[t, str(v)] for t, v in points]}


def test_each_rise_of_a_reasons_counter_is_a_decision_at_that_time():
    found = decisions_from_counters(
        [
            series("ScaleUp", [(110, 1), (120, 1), (130, 3)]),  # born inside the window at 1
            series("PowerLimitLowered", [(100, 2), (130, 2)]),  # there before: nothing new
            series("BudgetExhausted", [(100, 4), (110, 1)]),  # the operator restarted: 1 new
        ],
        start=100,  # a range query's first sample is at its start
    )
    assert [(d.time, d.reason, d.count) for d in found] == [
        (110, "BudgetExhausted", 1),
        (110, "ScaleUp", 1),
        (130, "ScaleUp", 2),
    ]


def test_a_counter_already_there_when_the_window_starts_is_no_decision():
    assert decisions_from_counters([series("ScaleUp", [(100, 5), (110, 5)])], start=100) == []


def test_events_inside_the_window_are_decisions_with_their_message_and_count():
    events = [
        {"reason": "ScaleUp", "message": "1 -> 2", "count": 1,
         "lastTimestamp": "2026-11-30T08:00:10Z"},
        {"reason": "PowerLimitLowered", "message": "to 200 W", "count": 3,
         "firstTimestamp": "2026-11-30T07:00:00Z", "lastTimestamp": "2026-11-30T08:00:20Z"},
        {"reason": "Old", "message": "before", "lastTimestamp": "2026-11-30T06:00:00Z"},
    ]  # fmt: skip
    start = 1796025600.0  # 2026-11-30T08:00:00Z
    found = decisions_from_events(events, start)
    assert [(d.time - start, d.reason, d.message, d.count) for d in found] == [
        (10, "ScaleUp", "1 -> 2", 1),
        (20, "PowerLimitLowered", "to 200 W", 3),
    ]


def test_a_range_queries_series_add_up_by_time_and_gaps_stay_gaps():
    line = matrix_line(
        "power",
        [
            {"values": [[1, "10"], [2, "NaN"], [3, "30"]]},
            {"values": [[3, "5"]]},
        ],
    )
    assert (line.times, line.values) == ([1, 3], [10, 35])


def test_without_prometheus_the_window_gives_power_energy_and_throughput():
    spec = {"replicas": 2, "energy": {"powerCapWatts": 300}}
    status = {
        "readyReplicas": 2,
        "targetReplicas": 2,
        "energy": {
            "consumedJoules": 3000.0,
            "budgetRemainingJoules": 7000.0,
            "gpuPowerLimitWatts": 250,
            "window": [[100, 1000.0, 0, 2], [110, 2000.0, 500, 2], [120, 3000.0, 1500, 2]],
        },
    }
    panels = status_panels(spec, status, now=125)
    lines = {line.name: line for group in panels.values() for line in group}
    assert list(panels) == list(PANELS)
    assert (lines["power"].times, lines["power"].values) == ([110, 120], [100.0, 100.0])
    assert lines["throughput"].values == [50.0, 100.0]
    assert lines["energy"].values == [1000.0, 2000.0, 3000.0]
    assert lines["budget"].values == [10000.0, 10000.0]  # consumed + remaining
    assert lines["cap"].values == [300.0, 300.0] and lines["limit"].values == [250.0, 250.0]
    assert lines["ready"].values[-1] == 2


def test_without_a_cap_or_budget_their_lines_are_empty_not_zero():
    panels = status_panels({"replicas": 1}, {"energy": {"consumedJoules": 5.0}}, now=10)
    lines = {line.name: line for group in panels.values() for line in group}
    assert lines["cap"].times == [] and lines["budget"].times == []
    assert lines["limit"].times == []


def sample_report(empty: str = "") -> Report:
    t = [1000.0 + 10 * i for i in range(31)]
    panels = {
        "Power (W)": [Line("power", t, [200 + (i % 5) * 20 for i in range(31)]),
                      Line("cap", t, [260.0] * 31)],
        "Energy (J)": [Line("energy", t, [i * 2000.0 for i in range(31)]),
                       Line("budget", t, [80000.0] * 31)],
        "Workers": [Line("desired", t, [4.0] * 31), Line("target", t, [2.0] * 15 + [3.0] * 16),
                    Line("ready", t, [2.0] * 16 + [3.0] * 15)],
        "Throughput (samples/s)": [Line("throughput", t, [100.0 + i for i in range(31)])],
        "GPU power limit (W)": [Line("limit", t, [250.0] * 10 + [220.0] * 21)],
    }  # fmt: skip
    if empty:
        panels[empty] = [Line(ln.name) for ln in panels[empty]]
    from joule.report.model import Decision

    decisions = [Decision(1100, "PowerLimitLowered", "to 220 W"), Decision(1150, "ScaleUp")]
    return Report("ml", "llm", 1000.0, 1300.0, "test data", panels, decisions)


def test_the_png_has_every_panel_where_it_says_each_with_its_lines(tmp_path):
    png = write(sample_report(empty="GPU power limit (W)"), tmp_path / "r.png")
    boxes = json.loads(Image.open(png).text[PANELS_KEY])
    assert list(boxes) == list(PANELS)
    assert not_blank(png) > 0.02
    expected = {
        "Power (W)": colours("power", "cap"),
        "Energy (J)": colours("energy", "budget"),
        "Workers": colours("desired", "target", "ready"),
        "Throughput (samples/s)": colours("throughput"),
    }
    for title, wanted in expected.items():
        for colour in wanted:
            assert pixels_of(png, colour, tuple(boxes[title])) > 50, (title, colour)
        assert pixels_of(png, DECISIONS, tuple(boxes[title])) > 20, title  # both decisions
    # The empty panel draws no line, only its "no data" and the decisions.
    limit_box = tuple(boxes["GPU power limit (W)"])
    assert pixels_of(png, colours("limit")[0], limit_box) == 0
    assert pixels_of(png, DECISIONS, limit_box) > 20


def test_the_html_page_holds_the_figure_and_every_decision(tmp_path):
    page = write(sample_report(), tmp_path / "r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert "TrainingJob ml/llm" in page
    assert "<td>PowerLimitLowered</td>" in page and "to 220 W" in page
    assert "<td>ScaleUp</td>" in page


def test_other_formats_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\.png or \.html"):
        write(sample_report(), tmp_path / "r.pdf")


def test_the_command_says_clearly_when_prometheus_cannot_be_reached(tmp_path, capsys):
    code = main(["report", "llm", "--prometheus", "http://127.0.0.1:9", "-o",
                 str(tmp_path / "r.png")])  # fmt: skip
    assert code == 2
    assert "could not ask Prometheus at http://127.0.0.1:9" in capsys.readouterr().err


def test_the_time_axis_starts_where_the_jobs_data_does_not_at_a_long_since():
    from dataclasses import replace

    from joule.report.draw import shown_from

    report = sample_report()  # data from 1000 to 1300
    assert shown_from(replace(report, start=-50000.0)) == pytest.approx(1000 - 9)
    assert shown_from(replace(report, start=1100.0)) == 1100.0  # the window cuts the data
    empty = replace(
        report,
        panels={t: [Line(ln.name) for ln in ls] for t, ls in report.panels.items()},
        decisions=[],
    )
    assert shown_from(replace(empty, start=5.0)) == 5.0
