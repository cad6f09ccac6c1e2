"""Bad command-line input is refused at once, naming the flag."""

import pytest

from joule.cli import main


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--jobs", "0"],
        ["simulate", "--gpus", "-8"],
        ["simulate", "--seeds", "0"],
        ["demo", "--gpus", "0"],
    ],
)
def test_bad_numbers_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert argv[1] in capsys.readouterr().err


def test_demo_with_missing_examples_says_so_before_starting_anything(tmp_path, capsys):
    assert main(["demo", "--examples", str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_demo_where_no_node_can_run_says_why_in_one_line_and_starts_nothing(
    tmp_path, capsys, monkeypatch
):
    import joule.demo.run

    def nothing_may_start(*_args, **_kwargs):
        raise AssertionError("the demo started something")

    reason = "a local node runs containerd and a kubelet, which need root: run as root, or ..."
    monkeypatch.setattr(joule.demo.run, "unavailable_reason", lambda: reason)
    monkeypatch.setattr(joule.demo.run.Demo, "up", nothing_may_start)
    monkeypatch.setattr(joule.demo.run.Interrupts, "install", nothing_may_start)
    assert main(["demo", "--examples", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and reason in err
