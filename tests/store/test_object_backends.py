"""The `ObjectStore` contract, held by every backend: the same tests on a directory and on a real S3
server (moto's, on loopback, with IAM authentication on). S3-only faults (credentials, bucket,
endpoint) are at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mask_store.object_location import open_objects
from mask_store.objects import TEMP_PREFIX, LocalObjects, ObjectConflict, ObjectStore, StoreUnavailable
from tests.support.forked import forked_processes
from tests.support.object_workers import content, is_complete, race
from tests.support.tcp_proxy import TcpProxy

WORKERS = Path(__file__).resolve().parents[1] / "support" / "object_workers.py"


@pytest.fixture
def backend(store_location) -> tuple[str, str]:
    return store_location


@pytest.fixture
def store(backend) -> ObjectStore:
    return open_objects(backend[1])


def snapshot(store: ObjectStore) -> dict[str, str | None]:
    """Every visible key and its tag: equal snapshots mean nothing visible changed."""
    return {key: store.tag(key) for key in store.list()}


def test_open_objects_picks_the_backend_by_scheme(backend):
    kind, location = backend
    store = open_objects(location)
    assert type(store).__name__ == {"local": "LocalObjects", "s3": "S3Objects"}[kind]
    assert store.list() == []


def test_put_get_tag_list_delete(store):
    assert store.get("a/x") is None and store.tag("a/x") is None and store.get_tagged("a/x") is None
    store.put("a/x", b"one")
    store.put("a/y", b"")
    store.put("b", b"\x00\xff" * 1000)
    assert store.get("a/x") == b"one" and store.get("a/y") == b"" and store.get("b") == b"\x00\xff" * 1000
    data, tag = store.get_tagged("a/x")
    assert data == b"one" and tag == store.tag("a/x")
    assert store.list() == ["a/x", "a/y", "b"] and store.list("a/") == ["a/x", "a/y"] and store.list("c") == []

    store.put("a/x", b"two")
    assert store.get("a/x") == b"two" and store.tag("a/x") != tag

    store.delete("a/x")
    store.delete("a/x")  # missing is not an error
    assert store.get("a/x") is None and store.tag("a/x") is None and store.list() == ["a/y", "b"]
    for bad in ("", "a//b", "../x", "a/./b", "/abs"):
        with pytest.raises(ValueError):
            store.put(bad, b"x")


def test_put_if_creates_only_when_absent(store):
    tag = store.put_if("index", b"gen 1", None)
    assert tag == store.tag("index") and store.get("index") == b"gen 1"
    before = snapshot(store)
    with pytest.raises(ObjectConflict):
        store.put_if("index", b"gen 1 again", None)
    assert snapshot(store) == before and store.get("index") == b"gen 1"


def test_put_if_refuses_a_stale_tag_and_leaves_the_store_as_it_was(store):
    first = store.put_if("index", b"gen 1", None)
    store.put("other", b"untouched")
    second = store.put_if("index", b"gen 2", first)
    assert second != first and second == store.tag("index")
    before = snapshot(store)
    with pytest.raises(ObjectConflict):
        store.put_if("index", b"gen 2 from a stale writer", first)
    with pytest.raises(ObjectConflict):  # expecting a tag on a key that does not exist
        store.put_if("gone", b"x", second)
    assert snapshot(store) == before
    assert store.get("index") == b"gen 2" and store.get("gone") is None


def test_threads_racing_on_one_tag_exactly_one_wins(store):
    racers, rounds = 6, 5
    store.put("index", b"start")

    def attempt(barrier: threading.Barrier, data: bytes, tag: str, winners: list[bytes]) -> None:
        barrier.wait(timeout=60)
        try:
            store.put_if("index", data, tag)
            winners.append(data)
        except ObjectConflict:
            pass

    for round_ in range(rounds):
        tag, barrier, winners = store.tag("index"), threading.Barrier(racers), []
        threads = [
            threading.Thread(target=attempt, args=(barrier, f"{round_}:{n}".encode(), tag, winners))
            for n in range(racers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert len(winners) == 1, f"round {round_}: winners {winners}"
        assert store.get("index") == winners[0]


@pytest.mark.slow  # forked processes
def test_processes_racing_on_one_tag_exactly_one_wins(backend, store):
    kind, location = backend
    rounds = 8
    store.put("index", b"start")
    context = forked_processes()  # two real processes, forked without importing torch again
    barrier, results = context.Barrier(2), context.Queue()
    processes = [
        context.Process(target=race, args=(kind, location, "index", rounds, name, barrier, results, dict(os.environ)))
        for name in ("A", "B")
    ]
    for process in processes:
        process.start()
    try:
        won = dict(results.get(timeout=240) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert sorted(won["A"] + won["B"]) == list(range(rounds)), won  # every round: one winner, never two
    last = rounds - 1
    assert store.get("index") == f"{'A' if last in won['A'] else 'B'}:{last}".encode()


@pytest.mark.slow  # a fresh interpreter
def test_a_writer_killed_mid_put_leaves_no_partial_object(backend, store):
    """Kill a writer process while an upload is half done: only whole objects are ever visible."""
    kind, location = backend
    size = 8 << 20 if kind == "local" else 1 << 20
    env = dict(os.environ)
    proxy = None
    if kind == "s3":  # a network we control: let through two whole objects and half of the third
        endpoint = env["AWS_ENDPOINT_URL"].rsplit(":", 1)
        proxy = TcpProxy(("127.0.0.1", int(endpoint[1])))
        proxy.hold_upstream_after(int(2.5 * size))
        env["AWS_ENDPOINT_URL"] = proxy.url
    writer = subprocess.Popen(
        [sys.executable, str(WORKERS), "write", kind, location, str(size)], env=env, stdout=subprocess.PIPE
    )
    try:
        if proxy is None:  # let one put finish, then catch the writer with a temporary half written
            assert writer.stdout.readline().strip() == b"0", f"the writer failed (exit code {writer.poll()})"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and writer.poll() is None:
            if proxy is not None and proxy.held.is_set():
                break
            if proxy is None and any(p.stat().st_size > 0 for p in Path(location).rglob(f"{TEMP_PREFIX}*")):
                break  # a temporary is being written right now
            time.sleep(0.001)
        else:
            pytest.fail(f"the writer never got mid-put (exit code {writer.poll()})")
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        if proxy is not None:
            proxy.stop()

    visible = store.list()
    assert visible, "not even one whole put became visible"
    for key in visible:
        data = store.get(key)
        assert is_complete(data, size), f"{key} holds a partial or foreign object ({len(data)} bytes)"
        assert key == f"w/{int(data[:8]) % 4}"
    if kind == "s3":  # objects 0 and 1 went through whole, object 2 only half: it must not exist
        assert visible == ["w/0", "w/1"] and store.get("w/2") is None and store.tag("w/2") is None
        assert store.get("w/0") == content(0, size)


@pytest.mark.slow
def test_the_directory_store_never_imports_boto3(tmp_path):
    code = (
        "import sys; from mask_store.object_location import open_objects; "
        f"s = open_objects({str(tmp_path / 's')!r}); s.put('k', b'v'); assert s.get('k') == b'v'; "
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, 'boto3 imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    local = open_objects(tmp_path / "p")
    assert isinstance(local, LocalObjects) and open_objects(local) is local


# -- S3 faults: each one a clear StoreUnavailable that names what to fix, within seconds -------------


def s3_store(server, prefix: str = "p", **options):
    from mask_store.s3_objects import S3Objects

    return S3Objects(f"s3://{server.bucket}/{prefix}", **options)


def test_wrong_secret_key_is_refused_at_construction_naming_the_setting(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StoreUnavailable, match="AWS_SECRET_ACCESS_KEY"):
        s3_store(s3_env)


def test_unknown_access_key_is_refused_naming_the_setting(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    with pytest.raises(StoreUnavailable, match="AWS_ACCESS_KEY_ID"):
        s3_store(s3_env)


def test_no_credentials_at_all_names_the_settings(s3_env, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(StoreUnavailable, match="no AWS credentials found.*AWS_ACCESS_KEY_ID"):
        s3_store(s3_env)


def test_missing_bucket_names_the_store_setting(s3_env):
    from mask_store.s3_objects import S3Objects

    with pytest.raises(StoreUnavailable, match="bucket 'no-such-bucket' does not exist.*PIGGYBACK_STORE"):
        S3Objects("s3://no-such-bucket/p")
    with pytest.raises(StoreUnavailable, match="not an s3://bucket/prefix URL"):
        S3Objects("s3:///no-bucket")


def test_a_stopped_endpoint_is_unavailable_not_a_hang(s3_env, monkeypatch):
    proxy = TcpProxy(("127.0.0.1", int(s3_env.endpoint.rsplit(":", 1)[1])))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        store = s3_store(s3_env, connect_timeout=1.0, read_timeout=1.0, max_attempts=2)
        store.put("k", b"v")
        tag = store.tag("k")
    finally:
        proxy.stop()
    for call in (lambda: store.get("k"), lambda: store.tag("k"), lambda: store.put("k", b"w"), store.list):
        with pytest.raises(StoreUnavailable, match="AWS_ENDPOINT_URL"):
            call()
    with pytest.raises(StoreUnavailable, match="outcome unknown"):
        store.put_if("k", b"w", tag)


@pytest.mark.slow  # waits out the client's timeout
def test_a_hung_endpoint_times_out_as_unavailable(s3_env, monkeypatch):
    proxy = TcpProxy(("127.0.0.1", int(s3_env.endpoint.rsplit(":", 1)[1])))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        store = s3_store(s3_env, connect_timeout=1.0, read_timeout=1.0, max_attempts=2)
        proxy.freeze()
        with pytest.raises(StoreUnavailable, match="cannot reach the S3 endpoint"):
            store.tag("k")
    finally:
        proxy.stop()
