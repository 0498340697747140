"""A step's method diagnostics: numbers averaged over its requests, Enum outcomes counted."""
from enum import IntEnum

import pytest

from editlab.methods.diagnostics import average_info
from editlab.methods.grace import Action


class Colour(IntEnum):
    RED = 0
    GREEN = 1


def test_numbers_are_averaged_and_enum_members_counted():
    infos = [{"loss": 1.0, "steps": 3, "kind": Colour.RED},
             {"loss": 2.0, "steps": 4, "kind": Colour.RED},
             {"loss": 6.0, "steps": 5, "kind": Colour.RED}]
    # every member gets a count, so a step logs the same keys whatever happened in it
    assert average_info(infos) == {"loss": 3.0, "steps": 4.0, "kind/red": 3.0, "kind/green": 0.0}


def test_grace_actions_are_counted_not_averaged():
    """The mean of "new" (0) and "split" (2) would read as "expand" (1)."""
    info = average_info([{"grace_action": Action.NEW}, {"grace_action": Action.SPLIT}])
    assert info == {"grace_action/new": 1.0, "grace_action/expand": 0.0, "grace_action/split": 1.0,
                    "grace_action/replace": 0.0}


def test_a_value_that_is_neither_is_an_error():
    with pytest.raises(TypeError, match="'note'"):
        average_info([{"note": "text"}])
