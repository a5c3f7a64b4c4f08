"""`vlp eval` argument handling (vlp.eval.command through vlp.cli.main): mistakes are one-line
errors with exit code 2, caught before any model is loaded."""

from __future__ import annotations

import pytest

from vlp.cli import build_parser, main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "sugarcrepe"], "--task sugarcrepe needs --data PATH"),
        (["--data", "x"], "--data and --option go with --task"),
        (["--task", "aro", "--data", "x", "batch_size=3"], "suite overrides, --path and --only"),
        # after --checkpoint (which takes several values), still an override
        (["batch_size=3", "--task", "aro", "--data", "x"], "suite overrides, --path and --only"),
        (["--task", "aro", "--data", "/nonexistent/aro"], "--data: /nonexistent/aro does not exist"),
        (["--task", "winoground", "--data", "."], "unknown eval task 'winoground'"),
        (["--task", "order", "--data", ".", "--option", "seed"], "--option 'seed': expected"),
        (["--suite", "/nonexistent.yaml"], "suite file /nonexistent.yaml not found"),
    ],
)
def test_argument_mistakes_exit_2_with_one_line(argv, message, capsys):
    code = main(["eval", "--checkpoint", "open_clip:vlp-tiny:random", *argv])

    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("vlp eval: error:")


def test_suite_and_task_are_mutually_exclusive():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--checkpoint", "c", "--suite", "s", "--task", "t"])
