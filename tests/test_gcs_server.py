"""tests/gcs_server.py through gcsfs: every byte of every object comes back (the emulator it replaces lost a
trailing `\\r`), in one request or resumable chunks, and listings, ranges, moves, deletions and exclusive
creation behave as on GCS.

Most tests drive the plain `gcsfs.core.GCSFileSystem` in this process with the server's address and anonymous
access as arguments, which is what STORAGE_EMULATOR_HOST and FSSPEC_GCS_TOKEN set. The gs:// URL route
(zarr through geosoc's store, geosoc's lock) runs in a fresh interpreter with exactly those environment
variables, as test_cloud.py does, since gcsfs picks its class when imported."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest

from tests.gcs_server import GcsServer
from tests.helpers import BUCKET, bucket_python

gcsfs_core = pytest.importorskip("gcsfs.core")
HttpError = pytest.importorskip("gcsfs.retry").HttpError
ENDINGS = [b"abc\r", b"abc\n", b"abc\r\n", b"", b"\r", b"\r\n\r\n", b"x\n--==0==--\r\n",
           np.random.default_rng(0).bytes(4096) + b"\r"]


@pytest.fixture
def fs(gcs_server: GcsServer) -> Any:
    """A fresh client; md5 consistency makes gcsfs check each upload's hash against what the server stored."""
    return gcsfs_core.GCSFileSystem(endpoint_url=gcs_server.url, token="anon", consistency="md5", skip_instance_cache=True)


@pytest.fixture
def root() -> str:
    return f"{BUCKET}/{uuid.uuid4().hex[:8]}"


def _http(server: GcsServer, method: str, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(urllib.request.Request(server.url + path, method=method)) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("data", ENDINGS, ids=lambda data: repr(data[-12:]))
def test_every_byte_comes_back(fs: Any, root: str, data: bytes) -> None:
    fs.pipe_file(f"{root}/piped", data)  # a multipart upload
    with fs.open(f"{root}/written", "wb") as file:  # a small file written: a multipart upload at close
        file.write(data)
    for name in ("piped", "written"):
        assert fs.cat_file(f"{root}/{name}") == data
        assert fs.info(f"{root}/{name}")["size"] == len(data)
        with fs.open(f"{root}/{name}", "rb") as file:
            assert file.read() == data


def test_a_large_object_goes_up_in_resumable_chunks(fs: Any, gcs_server: GcsServer, root: str) -> None:
    data = np.random.default_rng(1).bytes(3 * 2**20 + 12345) + b"\r"
    before = len(gcs_server.requests)
    with fs.open(f"{root}/streamed", "wb", block_size=2**20) as file:
        for start in range(0, len(data), 700_000):
            file.write(data[start:start + 700_000])
    fs.pipe_file(f"{root}/piped", data, chunksize=2**20)
    calls = gcs_server.requests[before:]
    assert sum("uploadType=resumable" in call and "upload_id" not in call for call in calls) == 2
    assert sum("upload_id=" in call for call in calls) >= 6  # chunks of about 1 MiB
    assert not any("uploadType=multipart" in call for call in calls)
    for name in ("streamed", "piped"):
        assert fs.cat_file(f"{root}/{name}") == data


def test_ranged_reads(fs: Any, root: str) -> None:
    data = bytes(range(256)) * 100 + b"\r"
    fs.pipe_file(f"{root}/ranged", data)
    fs.pipe_file(f"{root}/empty", b"")
    assert fs.cat_file(f"{root}/ranged", start=5, end=10) == data[5:10]
    assert fs.cat_file(f"{root}/ranged", start=-3) == data[-3:]
    assert fs.cat_file(f"{root}/ranged", start=len(data) - 1) == b"\r"
    assert fs.cat_file(f"{root}/ranged", start=100, end=10**9) == data[100:]
    assert fs.cat_file(f"{root}/empty", start=0) == b""
    with fs.open(f"{root}/ranged", "rb", block_size=1000) as file:
        file.seek(len(data) - 2)
        assert file.read() == data[-2:] and file.read() == b""
    with pytest.raises(HttpError, match="not satisfiable"):
        fs.cat_file(f"{root}/ranged", start=len(data) + 5, end=len(data) + 9)


def test_listing_folders_and_find(fs: Any, gcs_server: GcsServer, root: str) -> None:
    files = {"a": b"1", "d/b": b"2", "d/e/c": b"3", "d/e/f": b"4", "dd": b"5", "d.txt": b"6"}
    fs.pipe({f"{root}/{name}": data for name, data in files.items()})
    listed = {entry["name"]: entry["type"] for entry in fs.ls(root, detail=True)}
    assert listed == {f"{root}/{name}": kind for name, kind in
                      [("a", "file"), ("d", "directory"), ("dd", "file"), ("d.txt", "file")]}
    assert fs.ls(f"{root}/d") == [f"{root}/d/b", f"{root}/d/e"]
    assert fs.info(f"{root}/d/e")["type"] == "directory" and fs.isdir(f"{root}/d")
    assert fs.info(f"{root}/d/e/c")["size"] == 1 and not fs.exists(f"{root}/d/x")
    assert fs.find(root) == sorted(f"{root}/{name}" for name in files)
    assert fs.find(f"{root}/d", withdirs=True) == [f"{root}/d{name}" for name in ("", "/b", "/e", "/e/c", "/e/f")]
    # Pages of two entries, prefixes and objects together, in name order; offsets bound the names.
    key, seen, token = root.split("/", 1)[1], [], ""
    while True:
        status, page = _http(gcs_server, "GET", f"/storage/v1/b/{BUCKET}/o?prefix={key}/&delimiter=/&maxResults=2"
                                             f"&pageToken={token}")
        assert status == 200 and len(page.get("items", [])) + len(page.get("prefixes", [])) <= 2
        seen += page.get("prefixes", []) + [item["name"] for item in page.get("items", [])]
        if not (token := page.get("nextPageToken", "")):
            break
    assert seen == [f"{key}/{name}" for name in ("a", "d.txt", "d/", "dd")]
    status, page = _http(gcs_server, "GET", f"/storage/v1/b/{BUCKET}/o?startOffset={key}/d/&endOffset={key}/d/e/f")
    assert [item["name"] for item in page["items"]] == [f"{key}/d/b", f"{key}/d/e/c"]


def test_errors_have_gcs_shape(gcs_server: GcsServer) -> None:
    status, body = _http(gcs_server, "GET", f"/storage/v1/b/{BUCKET}/o/no%2Fsuch")
    assert status == 404 and body["error"]["code"] == 404 and f"{BUCKET}/no/such" in body["error"]["message"]
    status, body = _http(gcs_server, "GET", "/storage/v1/b/no-such-bucket/o")
    assert status == 404 and body["error"]["errors"][0]["reason"] == "notFound"


def test_rm_recursive_copy_and_mv_of_a_folder(fs: Any, root: str) -> None:
    files = {"tree/a": b"1\r", "tree/sub/b": b"2\r\n", "tree/sub/deeper/c": b""}
    fs.pipe({f"{root}/{name}": data for name, data in files.items()})
    fs.copy(f"{root}/tree", f"{root}/copy", recursive=True)  # rewriteTo
    fs.mv(f"{root}/tree", f"{root}/moved", recursive=True)  # moveTo
    assert fs.find(root) == sorted(f"{root}/{kind}/{name.split('/', 1)[1]}" for kind in ("copy", "moved")
                                   for name in files)
    for name, data in files.items():
        assert fs.cat_file(f"{root}/moved/{name.split('/', 1)[1]}") == data
        assert fs.cat_file(f"{root}/copy/{name.split('/', 1)[1]}") == data
    fs.rm(f"{root}/copy", recursive=True)
    assert fs.find(root) == [f"{root}/moved/{name.split('/', 1)[1]}" for name in sorted(files)]
    fs.merge(f"{root}/joined", [f"{root}/moved/a", f"{root}/moved/sub/b"])  # compose
    assert fs.cat_file(f"{root}/joined") == b"1\r2\r\n"


def test_a_conditional_create_is_refused_the_second_time(fs: Any, gcs_server: GcsServer, root: str) -> None:
    fs.pipe_file(f"{root}/lock", b"first\r", mode="create")  # ifGenerationMatch=0
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{root}/lock", b"second", mode="create")
    with pytest.raises(FileExistsError), fs.open(f"{root}/lock", "xb", block_size=2**20) as file:
        file.write(b"x" * (3 * 2**20))  # a resumable upload, refused when it ends
    assert fs.cat_file(f"{root}/lock") == b"first\r"
    generation = int(fs.info(f"{root}/lock")["generation"])
    lock = f"/storage/v1/b/{BUCKET}/o/" + quote(f"{root}/lock".split("/", 1)[1], safe="")
    assert _http(gcs_server, "DELETE", f"{lock}?ifGenerationMatch={generation + 1}")[0] == 412
    fs.setxattrs(f"{root}/lock", owner="me")  # metageneration 2
    assert _http(gcs_server, "DELETE", f"{lock}?ifMetagenerationMatch=1")[0] == 412
    assert _http(gcs_server, "DELETE", f"{lock}?ifGenerationMatch={generation}&ifMetagenerationMatch=2")[0] == 204
    fs.pipe_file(f"{root}/lock", b"again", mode="create")


def test_zarr_chunks_ending_in_cr_through_gs_urls(gcs: dict[str, str]) -> None:
    """A Zarr v3 array on gs:// through geosoc's store: raw chunks (no compressor) that end in `\\r`."""
    url = f"gs://{BUCKET}/{uuid.uuid4().hex[:8]}/cr.zarr"
    out = bucket_python(gcs, "import fsspec, numpy as np, zarr\n"
                          "from geosoc.io.storage import zarr_store\n"
                          "data = np.tile(np.array([1, 2, 3, 13], dtype='uint8'), 16)\n"
                          f"array = zarr.create_array(zarr_store({url!r}), shape=data.shape, chunks=(4,), "
                          "dtype='uint8', compressors=None, fill_value=0)\n"
                          "array[:] = data\n"
                          f"back = zarr.open_array(zarr_store({url!r}, read_only=True))[:]\n"
                          "assert back.tobytes() == data.tobytes(), back\n"
                          f"fs = fsspec.filesystem('gs'); chunk = fs.cat_file({url[5:]!r} + '/c/3')\n"
                          "assert chunk == bytes([1, 2, 3, 13]), chunk\n"
                          "print('ok', type(fs).__module__)\n")
    assert out.split() == ["ok", "gcsfs.core"]  # the plain client, as the environment variables select


def test_stop_closes_only_this_server() -> None:
    first, second = GcsServer(buckets=["a"]).start(), GcsServer(buckets=["b"]).start()
    first.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(first.url + "/storage/v1/b/a", timeout=5)
    assert _http(second, "GET", "/storage/v1/b/b") == (200, second.buckets["b"])
    second.stop()
