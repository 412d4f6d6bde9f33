"""Writer processes for the object-store contract tests: real processes, racing or killed mid-write.

Run as a script (`python tests/support/object_workers.py write KIND LOCATION SIZE`) it is a writer that puts
self-describing objects forever, printing each index once its put returned.
"""

from __future__ import annotations

import hashlib
import os
import sys

from mask_store.objects import LocalObjects, ObjectConflict, ObjectStore


def open_backend(kind: str, location: str) -> ObjectStore:
    """The same construction the tests use in-process (S3 settings come from the inherited environment)."""
    if kind == "local":
        return LocalObjects(location)
    from mask_store.s3_objects import S3Objects

    return S3Objects(location, connect_timeout=2.0, read_timeout=10.0)


def content(index: int, size: int) -> bytes:
    """`size` bytes that say which write they are: an 8-digit index, then a fill derived from it."""
    fill = hashlib.sha256(str(index).encode()).digest()
    body = (fill * (size // len(fill) + 1))[: size - 8]
    return f"{index:08d}".encode() + body


def is_complete(data: bytes, size: int) -> bool:
    """True when `data` is exactly one whole write of `content`."""
    return len(data) == size and data[:8].isdigit() and data == content(int(data[:8]), size)


def write_forever(kind: str, location: str, size: int) -> None:
    store = open_backend(kind, location)
    index = 0
    while True:
        store.put(f"w/{index % 4}", content(index, size))
        print(index, flush=True)
        index += 1


def race(kind: str, location: str, key: str, rounds: int, name: str, barrier, results, env: dict) -> None:
    """Each round: all racers read the same tag, then all put_if on it; report which rounds were won.
    `env`: the test's environment (the S3 endpoint and keys), which a forked racer does not inherit."""
    os.environ.update(env)
    store = open_backend(kind, location)
    won = []
    for round_ in range(rounds):
        barrier.wait(timeout=120)
        tag = store.tag(key)
        barrier.wait(timeout=120)  # nobody writes before everyone has read
        try:
            store.put_if(key, f"{name}:{round_}".encode(), tag)
            won.append(round_)
        except ObjectConflict:
            pass
        barrier.wait(timeout=120)  # nobody reads the next tag before every write of this round is done
    results.put((name, won))


if __name__ == "__main__":
    command, kind, location, size = sys.argv[1:]
    assert command == "write"
    write_forever(kind, location, int(size))
