"""The key=value command lines of the editlab subcommands (editlab.args)."""
import pytest

from editlab.args import UsageError, key_values, parse_args

DEFAULTS = {"run_dir": [], "out": None, "window": 50, "dry_run": False, "filter": ""}


def test_values_are_read_by_the_type_of_their_default():
    args = parse_args(["run_dir=a", "run_dir=[b, c]", "window=5", "dry_run=true", "filter=Config('x') = 'y:z'"],
                      DEFAULTS)
    # a repeated list key adds up; a string is kept as typed, '=' and ':' included
    assert args == {"run_dir": ["a", "b", "c"], "out": None, "window": 5, "dry_run": True,
                    "filter": "Config('x') = 'y:z'"}
    assert parse_args([], {"tasks": ["sst2"]})["tasks"] == ["sst2"]
    assert parse_args(["tasks=[rte]"], {"tasks": ["sst2"]})["tasks"] == ["rte"]  # given, it replaces the default


@pytest.mark.parametrize("argv, message", [
    (["rundir=x"], "unknown argument 'rundir'"),
    (["run_dir"], "expected key=value"),
    (["run_dir=a", "window=five"], "expected an integer"),
    (["run_dir=a", "dry_run=maybe"], "expected true or false"),
    (["out=x"], "missing run_dir="),
])
def test_bad_command_lines_are_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(argv, DEFAULTS, required=("run_dir",), usage="editlab x run_dir=DIR")


def test_key_values_keep_order_and_hydra_prefixes():
    assert key_values(["+a=1", "mend.b=x=y"]) == [("+a", "1"), ("mend.b", "x=y")]
