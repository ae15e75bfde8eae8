"""Cubes on s3:// through a real S3 API server on loopback (moto server) and s3fs, as users configure it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()).create_bucket(Bucket="soil")
    yield endpoint
    server.stop()


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


def test_build_and_open_cube_on_s3(s3_endpoint: str, write_catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog_path = write_catalog()
    env = {**os.environ, **CREDENTIALS, "FSSPEC_S3_ENDPOINT_URL": s3_endpoint}
    proc = subprocess.run(
        [sys.executable, "-m", "geosoc.cli", "build-cube", "--catalog", str(catalog_path), "--root",
         "s3://soil/tiny", "-q"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cube complete: s3://soil/tiny/cube.zarr" in proc.stdout
    assert "testing" not in proc.stdout + proc.stderr  # no secret in the output

    import fsspec

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_endpoint})
    from geosoc.catalog import load_catalog
    from geosoc.cube import open_cube
    from geosoc.sources import open_layers

    tree = open_cube("s3://soil/tiny/cube.zarr")
    assert tree.attrs["geosoc_status"] == "complete"
    for layer in open_layers(load_catalog(path=catalog_path)):
        np.testing.assert_array_equal(tree[layer.group].to_dataset()["data"].values, layer.lazy().values)
    keys = boto3.client("s3", endpoint_url=s3_endpoint, **_boto_credentials()).list_objects_v2(
        Bucket="soil", Prefix="tiny/"
    )
    names = [item["Key"] for item in keys["Contents"]]
    assert "tiny/cube.zarr/zarr.json" in names
    assert not any(".progress" in name for name in names)


def test_missing_bucket_is_a_clear_error(s3_endpoint: str, write_catalog, tmp_path: Path) -> None:
    env = {**os.environ, **CREDENTIALS, "FSSPEC_S3_ENDPOINT_URL": s3_endpoint}
    proc = subprocess.run(
        [sys.executable, "-m", "geosoc.cli", "build-cube", "--catalog", str(write_catalog()), "--root",
         "s3://no-such-bucket/tiny", "-q"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1
    assert "s3://no-such-bucket/tiny: cannot write here" in proc.stderr and "Traceback" not in proc.stderr
