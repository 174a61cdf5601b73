"""Moto-backed S3 for tests: one ``ThreadedMotoServer`` on 127.0.0.1 per test process, a bucket per test.

The server's endpoint and fake credentials are exported as environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``, keys, region us-east-1) so that boto3,
s3fs and ``fsspec`` in this process, and, when set before Ray starts or passed through
``runtime_env``, in the controller and rank processes, reach it. ``mock_aws`` would not
reach other processes; a real server does. Runs in the pytest process; moto, boto3 and
s3fs are imported inside functions.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Optional

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",  # moto and s3fs agree on us-east-1 without location constraints
    "AWS_REGION": "us-east-1",
}
# Variables that would send boto3 to a real account instead of the moto server.
AWS_UNSET = ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


class MotoS3:
    """A moto S3 server on 127.0.0.1 with an OS-chosen port.

    >>> server = MotoS3().start()  # doctest: +SKIP
    >>> server.env["AWS_ENDPOINT_URL"]  # doctest: +SKIP
    'http://127.0.0.1:40123'
    """

    def __init__(self):
        self._server = None
        self.endpoint = ""

    def start(self) -> "MotoS3":
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    @property
    def env(self) -> dict:
        """What a process needs in its environment to use this server as S3."""
        return dict(AWS_ENV, AWS_ENDPOINT_URL=self.endpoint, AWS_ENDPOINT_URL_S3=self.endpoint)

    def create_bucket(self, prefix: str = "trainkit-test", *, name: Optional[str] = None) -> str:
        """Create a bucket: ``name``, or a fresh ``<prefix>-<random>`` one; returns its name."""
        import boto3

        name = name or f"{prefix}-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=name)
        return name

    def filesystem(self):
        """A fresh (uncached) s3fs filesystem on this server."""
        import s3fs

        return s3fs.S3FileSystem(key="testing", secret="testing", token="testing", skip_instance_cache=True,
                                 use_listings_cache=False,
                                 client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"})

    def stop(self) -> None:
        clear_s3fs_cache()
        if self._server is not None:
            self._server.stop()
            self._server = None


def clear_s3fs_cache() -> None:
    """Forget cached s3fs instances and listings (a bucket of one test never shows in another's)."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


def export_env(server: MotoS3, monkeypatch: Any) -> None:
    """Point this process's AWS clients at ``server`` (undone by the monkeypatch)."""
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    for k in AWS_UNSET:
        monkeypatch.delenv(k, raising=False)


@dataclass(frozen=True)
class S3Storage:
    """What the ``s3_storage`` fixture gives: a fresh bucket's ``s3://`` path and a filesystem on it.

    >>> def test_checkpoints_land_in_s3(run_training, s3_storage):  # doctest: +SKIP
    ...     result = run_training(train_fn, storage=s3_storage.path)
    ...     assert s3_storage.fs.ls(f"{s3_storage.bucket}/runs")
    """

    path: str  # s3://<bucket>/runs: a storage_path for RunConfig
    bucket: str
    endpoint: str
    fs: Any  # s3fs.S3FileSystem on the moto server

    def __str__(self) -> str:
        return self.path

    def __fspath__(self) -> str:
        return self.path

    def ls(self, subpath: str = "") -> list[str]:
        """Every object under ``path/subpath``, as ``s3://`` URIs (recursive)."""
        root = f"{self.bucket}/runs/{subpath}".rstrip("/")
        return sorted(f"s3://{p}" for p in self.fs.find(root))
