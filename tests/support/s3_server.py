"""A real S3-compatible HTTP server for the tests: moto's server app, on loopback, with real credentials.

No MinIO package is installable here; moto's standalone server is. Two things differ from
`python -m moto.server`, both to make it behave like S3 rather than to make tests pass:

- moto checks `If-Match` / `If-None-Match` and then writes, in two steps, and its server handles
  requests on parallel threads: two conditional writers could both pass the check. S3, MinIO and Ceph
  decide a conditional write atomically, so this server handles one request at a time (connections
  are still concurrent; a request that waits for the lock still races on the wire).
- It binds port 0 and prints the port it got, so parallel test runs never collide.

`moto_s3()` starts it, creates an IAM user with S3 rights and a bucket, then switches IAM
authentication on: from then on only that user's keys work, so wrong credentials are really refused.
Run as a script, this file is the server process.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REGION = "us-east-1"


def _serve() -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def one_at_a_time(environ, start_response):
        with lock:
            return list(app(environ, start_response))

    server = make_server("127.0.0.1", 0, one_at_a_time, threaded=True, request_handler=MotoRequestHandler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


@dataclass(frozen=True)
class MotoS3:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    pid: int

    def env(self, **overrides: str) -> dict[str, str]:
        """The standard AWS variables a client of this server needs (nothing else is read)."""
        values = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
        }
        values.update(overrides)
        return values


@contextlib.contextmanager
def moto_s3(bucket: str = "piggyback-test") -> Iterator[MotoS3]:
    """Start the server, make a user and a bucket, enforce authentication; stop it by pid at the end."""
    import boto3
    import httpx

    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve())],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
    )
    try:
        line = process.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"moto server did not start (exit code {process.poll()})")
        endpoint = f"http://127.0.0.1:{int(line)}"
        admin = dict(endpoint_url=endpoint, region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="piggyback")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="piggyback", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="piggyback")["AccessKey"]
        boto3.client("s3", **admin).create_bucket(Bucket=bucket)
        httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()
        yield MotoS3(endpoint, bucket, key["AccessKeyId"], key["SecretAccessKey"], process.pid)
    finally:
        from tests.support.servers import stop_process

        stop_process(process, grace_s=10)


if __name__ == "__main__":
    _serve()
