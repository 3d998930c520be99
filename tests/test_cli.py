"""The command line: help lists every subcommand; bad input exits 2 with a named error."""

import pytest

from experiments.cli import build_parser, main

COMMANDS = ("quickstart", "demos", "train-policy", "fit-verifier", "eval", "scaling", "bench",
            "report", "grid")


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_overrides_may_follow_options():
    parser = build_parser()
    args, extra = parser.parse_known_args(["fit-verifier", "cfn", "--policy", "p", "--out", "o",
                                           "epochs=3", "collect.mode=single"])
    assert args.overrides == [] and extra == ["epochs=3", "collect.mode=single"]


@pytest.mark.parametrize("argv, message", [
    (["demos", "--task", "stack", "--out", "x"], "task"),
    (["demos", "--mix", "optimal=0.5,lazy=0.5", "--out", "x"], "lazy"),
    (["demos", "--mix", "optimal=0.5", "--out", "x"], "sum to 1"),
    (["fit-verifier", "bogus", "--policy", "p", "--out", "x"], "trainable: ["),
])
def test_bad_input_exits_2_naming_the_problem(argv, message, capsys, tmp_path):
    argv = [a if a != "x" else str(tmp_path / "out") for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
