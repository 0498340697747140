"""Missing data skips a data test locally and fails it in CI (where a skip would pass silently)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.parametrize("ci, outcome", [("", "1 skipped"), ("true", "1 error"), ("1", "1 error")])
def test_missing_data_fails_only_in_ci(tmp_path, ci, outcome):
    env = {**os.environ, "CI": ci, "EDITLAB_DATA": str(tmp_path / "nothing")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/test_data.py::test_sample_orders_are_the_papers"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert outcome in done.stdout, done.stdout
    assert f"no data at {tmp_path / 'nothing'}: set EDITLAB_DATA" in done.stdout
