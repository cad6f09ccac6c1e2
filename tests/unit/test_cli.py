"""Bad command-line input is refused at once, naming the flag."""

import pytest

from joule.cli import main


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--jobs", "0"],
        ["simulate", "--gpus", "-8"],
        ["simulate", "--seeds", "0"],
        ["node-agent", "--gpus", "-1"],
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


def test_a_bad_taint_is_refused_before_the_agent_connects(capsys):
    assert main(["node-agent", "--taint", "dedicated", "--kubeconfig", "/nonexistent"]) == 2
    assert "NoSchedule" in capsys.readouterr().err


def test_a_missing_kubeconfig_is_a_clear_error(tmp_path, capsys):
    assert main(["node-agent", "--kubeconfig", str(tmp_path / "none")]) == 2
    assert "no usable kubeconfig" in capsys.readouterr().err
