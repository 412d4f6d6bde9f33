"""`python -m service` stays the embedded single-process default: building its app never imports ray."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_the_single_process_server_does_not_import_ray(tmp_path):
    code = (
        "import sys, service.__main__\n"
        "from service.app import create_app\n"
        "from service.settings import Settings\n"
        f"create_app(Settings(store={str(tmp_path)!r}))\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
