"""`scripts/gpu_check.py` meets a GPU rarely, so what can be held on CPU is: its plan names every step with
a CUDA command and a CPU form inside the time budget, it refuses a machine without CUDA in one line, and its
dry run (slow: it starts a real server) ends in one table with a status for every step."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import run_as_group

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
STEPS = ("pytest -m gpu", "kernel benchmark", "load benchmark", "mixed-forward benchmark")
STATUSES = {"passed", "failed", "skipped", "missing"}


def gpu_check(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """The script and every step it starts (a benchmark's server too) go when it returns or times out."""
    return run_as_group([sys.executable, str(SCRIPT), *args], timeout, cwd=ROOT, env={**os.environ, **env})


def test_plan_names_every_step_with_a_cuda_command_and_a_cpu_form_within_the_budget():
    result = gpu_check("--list", timeout=60)
    assert result.returncode == 0, result.stderr
    budget = re.search(r"timeouts summing to (\d+) s of the (\d+) s budget", result.stdout)
    assert budget and int(budget.group(1)) < int(budget.group(2)) <= 8 * 60
    blocks = re.split(r"^step ", result.stdout, flags=re.MULTILINE)[1:]
    assert [block.split(" (timeout")[0] for block in blocks] == list(STEPS)
    for block in blocks:
        cuda = re.search(r"on cuda:\s+(.+)", block).group(1)
        cpu = re.search(r"--dry-run:\s+(.+)", block).group(1)
        assert re.search(r"leaves out: \S", block)
        if "--device" in cuda:  # the benchmarks: cuda on the GPU, cpu in the rehearsal
            assert "--device cuda" in cuda and "--device cpu" in cpu and "cuda" not in cpu
    assert "-m gpu" in blocks[0]


@pytest.mark.slow  # the script in a child process
def test_without_cuda_and_without_dry_run_it_exits_2_in_one_line():
    result = gpu_check(timeout=120, CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "--dry-run" in result.stderr


@pytest.mark.slow
def test_dry_run_ends_in_one_table_with_a_status_for_every_step(tmp_path):
    result = gpu_check("--dry-run", "--quick", "--log-dir", str(tmp_path), timeout=400)
    table = result.stdout[result.stdout.rindex("\ndevice: ") + 1 :].splitlines()
    assert table[1].startswith("| step | status | seconds | headline | not covered on CPU |")
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[3:])}
    assert list(rows) == list(STEPS), result.stdout
    assert all(status in STATUSES and headline and not_covered for status, _, headline, not_covered in rows.values())
    assert rows["pytest -m gpu"][0] == "skipped" and "0 failed" in rows["pytest -m gpu"][2]
    assert rows["kernel benchmark"][0] == "passed" and "all bit-exact" in rows["kernel benchmark"][2]
    assert rows["load benchmark"][0] == "passed" and "req/s" in rows["load benchmark"][2]
    mixed = rows["mixed-forward benchmark"][0]
    assert (mixed == "missing") == (not (ROOT / "scripts" / "bench_mixed.py").exists())
    assert result.returncode == (1 if mixed == "failed" else 0), result.stdout + result.stderr
