"""Settings that would break the server later are refused at start, naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.settings import Settings


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
def test_a_store_poll_interval_that_would_kill_the_watcher_is_refused(value):
    with pytest.raises(ValidationError, match="store_poll_s"):
        Settings(store_poll_s=value)


def test_the_server_refuses_to_start_with_an_infinite_store_poll_interval():
    env = {**os.environ, "PIGGYBACK_STORE_POLL_S": "inf"}
    done = subprocess.run([sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "store_poll_s" in done.stderr and "Traceback" not in done.stderr
