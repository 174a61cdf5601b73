"""Shared fixtures for trainkit's own tests.

``s3_server`` starts one moto S3 server per test process (each pytest-xdist worker gets
its own, on its own free port) and points boto3/s3fs at it through the environment;
``s3_bucket`` gives each test a fresh bucket on it. Moto and boto3 are imported only
when an S3 test asks for them.
"""

from __future__ import annotations

import os
import uuid

import pytest

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto S3 server private to this test process."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _AWS_ENV.items():
            mp.setenv(k, v)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        for k in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(k, raising=False)
        try:
            yield endpoint
        finally:
            _clear_s3fs_cache()
            server.stop()


def _clear_s3fs_cache() -> None:
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the test process's moto server; its name."""
    import boto3

    name = f"trainkit-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    _clear_s3fs_cache()  # no listing cached from another test's view of storage
    yield name


@pytest.fixture
def storage_path(tmp_path):
    """An absolute local storage_path for a run, private to the test."""
    path = tmp_path / "storage"
    path.mkdir()
    return str(path)


@pytest.fixture(autouse=True)
def _no_ambient_storage_env(monkeypatch, tmp_path):
    """A run that forgets storage_path writes under tmp_path, never into ~/trainkit_results."""
    monkeypatch.setenv("TRAINKIT_STORAGE_PATH", os.fspath(tmp_path / "default_storage"))
