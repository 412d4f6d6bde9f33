"""Real processes without a Python start each: forked from one server process that imported torch,
the service, the training CLI and the object-store workers once.

`python -m service` and `python -m training` pay 3-5 s of CPU importing torch and torchvision before they
do anything; a test that needs a process for what a process gives (its own PID, signals, SIGKILL, a
socket, its RSS, its exit status and output) does not need that import again. The forked process is a
child of the fork server, not of the test, so the suite sees it through `ForkedProcess`, which answers
like `subprocess.Popen`. What starting the interpreter does (imports, `-m` resolution, no ray imported)
is held by the tests that run the commands verbatim (tests/docs, test_single_process_without_ray.py).
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

# one fork server per test process (multiprocessing starts it once, with the first list it is given)
PRELOAD = ["service.__main__", "service.app", "uvicorn", "training.cli", "tests.support.object_workers"]
SERVICE = "service.__main__:main"  # what `python -m service` runs
TRAINING = "training.cli:main"  # what `python -m training` runs


def forked_processes():
    """A multiprocessing context whose processes fork from the fork server: a fork each, not an
    interpreter start, and no child inherits the test process's thread pools."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _close(process: multiprocessing.Process, *paths: Path) -> None:
    """Kill the process if it still runs (a test that failed before stopping it), then remove its output."""
    if process.exitcode is None:
        process.kill()
        process.join()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _output_file(kind: str) -> Path:
    handle, path = tempfile.mkstemp(prefix=f"piggyback-forked-{kind}-", suffix=".log")
    os.close(handle)
    return Path(path)


def _run_main(entry: str, argv: list[str] | None, env: dict[str, str], stdout: str, stderr: str) -> None:
    """The child: the environment the command would get, its output to the two files, then its main."""
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        with open(path, "ab", buffering=0) as out:
            os.dup2(out.fileno(), fd)
    module, name = entry.split(":")
    main = getattr(importlib.import_module(module), name)
    sys.exit(main() if argv is None else main(argv))


class ForkedProcess:
    """`entry` (module:function, called with `argv` unless None) with `env`, forked from the fork server;
    the `subprocess.Popen` calls the suite makes (pid, poll, wait, returncode, terminate, kill,
    send_signal) work on it. Its stdout and stderr go to files (one file unless `split_output`)."""

    def __init__(self, entry: str, env: dict[str, str], argv: list[str] | None = None, split_output: bool = False):
        self.stdout_file = _output_file("out")
        self.stderr_file = _output_file("err") if split_output else self.stdout_file
        self.args = [entry, *(argv or [])]
        files = (str(self.stdout_file), str(self.stderr_file))
        self._process = forked_processes().Process(target=_run_main, args=(entry, argv, env, *files))
        self._process.start()
        self.pid = self._process.pid
        # called once the output is read; else when the object goes, or at exit before multiprocessing would
        # wait for a forgotten server: nothing a test started outlives it
        self.close = weakref.finalize(self, _close, self._process, self.stdout_file, self.stderr_file)

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()

    def output(self, tail: int = 4000) -> str:
        """The end of what the process wrote (to stdout, and to stderr unless split)."""
        return self.stdout_file.read_text(errors="replace")[-tail:] if self.stdout_file.exists() else ""


def run_forked(entry: str, argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`subprocess.run(..., capture_output=True, text=True, timeout=...)` for a forked `entry`."""
    process = ForkedProcess(entry, env, argv, split_output=True)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    finally:
        out, err = (path.read_text(errors="replace") for path in (process.stdout_file, process.stderr_file))
        process.close()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)
