"""The pipeline on cloud URLs: a real S3 API server (moto) and a GCS JSON API server (tests/gcs_server.py, which
keeps every byte) on loopback, reached through s3fs and gcsfs exactly as users configure them (environment
variables only)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from geosoc.sources.synthetic import Landscape
from tests.commands import DEMO_PART, MAP_PART, demo_points, one_error_line, run_commands, writing_commands
from tests.helpers import BUCKET, bucket_listing, bucket_python, bucket_settings, free_port, tiny_catalog_dict


def _cli(env: dict[str, str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **bucket_settings(env)}
    return subprocess.run([sys.executable, "-m", "geosoc.cli", *args], capture_output=True, text=True, env=full,
                          timeout=timeout)


def _cli_steps(env: dict[str, str], steps: list[tuple[list[str], dict[str, str]]],
               keep_going: bool = False) -> list[dict[str, Any]]:
    """CLI commands in one fresh interpreter with the bucket's settings (see `commands.run_commands`)."""
    return run_commands(steps, bucket_settings(env), keep_going)


@pytest.mark.slow
def test_whole_pipeline_on_a_bucket(bucket: dict[str, str], tmp_path: Path) -> None:
    """build-cube, sample, finetune (streaming) and predict (with exports) with --root on the bucket, via the CLI."""
    data = tiny_catalog_dict(size_px=64, chunk=32)
    data.update(sampling={"patch_size": 8, "fold_block_size": 600, "folds": 3},
                model={"image": {"patch": 4, "dim": 16, "depth": 1, "heads": 2},
                       "climate": {"dim": 16, "layers": 1, "heads": 2, "feedforward": 32}, "embedding": 8},
                training={"finetune": {"epochs": 2, "batch_size": 16, "learning_rate": 0.001}},
                predict={"resolution": 120})
    catalog = tmp_path / "tiny.yaml"
    catalog.write_text(yaml.safe_dump(data))
    x0, y0 = data["region"]["bounds"][:2]
    rng = np.random.default_rng(0)
    x, y = x0 + rng.uniform(100, 1800, 80), y0 + rng.uniform(100, 1800, 80)
    soc = Landscape(7).soc_at(x, y, "EPSG:3035")
    points = tmp_path / "points.csv"
    pd.DataFrame({"site": range(80), "x": x, "y": y, "soc": soc}).to_csv(points, index=False)
    root = f"{bucket['scheme']}://{BUCKET}/tiny"
    sample = ("sample", "--catalog", str(catalog), "--root", root, "--points", str(points), "--id-col", "site",
              "--x-col", "x", "--y-col", "y", "--target-col", "soc", "--points-crs", "EPSG:3035", "-q")
    # Fine-tuning streams the SampleSet from the bucket (nothing held in memory) through a forked loader worker.
    streamed = {"GEOSOC_IN_MEMORY_MIB": "0", "GEOSOC_LOADER_WORKERS": "1"}
    steps = [
        (["build-cube", "--catalog", str(catalog), "--root", root, "-q"], {}),
        (list(sample), {}),
        (list(sample), {}),  # the second replaces the first: a folder moved without a rename on an object store
        (["finetune", "--catalog", str(catalog), "--root", root, "--test-fold", "0", "-q"], streamed),
        (["predict", "--catalog", str(catalog), "--root", root, "-q"], {}),
    ]
    for result in _cli_steps(bucket, steps):
        assert result["exit_code"] == 0, f"{result['step']}: {result['output'][-3000:]}"
        assert "testing" not in result["output"]  # no secret in the output
    names = set(bucket_listing(bucket, root))
    for model_file in ("model", "aoa"):  # a checkpoint's files are named by their content: model.<digest>.safetensors
        assert any(re.fullmatch(rf"models/finetune/{model_file}\.[0-9a-f]{{16}}\.safetensors", name) for name in names)
    for expected in ("cube.zarr/zarr.json", "samples/labelled.zarr/zarr.json", "models/finetune/config.json",
                     "maps/soc.zarr/zarr.json", "maps/soc_median.tif",
                     "maps/soc_q05.tif", "maps/soc_q95.tif", "maps/aoa.tif", "maps/quicklook.png", "maps/item.json"):
        assert expected in names, expected
    assert not any(".partial" in name or ".progress" in name for name in names)
    check = (
        "import geosoc, numpy as np; from geosoc.maps.inference import open_map; "
        f"m = open_map({root + '/maps/soc.zarr'!r}); "
        "assert m.attrs['geosoc_status'] == 'complete'; v = m['soc_median'].values; "
        "assert np.isfinite(v).mean() > 0.5, v; print('ok', m.sizes['y'], m.sizes['x'])"
    )
    assert bucket_python(bucket, check).startswith("ok")


def test_cube_on_a_bucket_equals_its_sources(bucket: dict[str, str], write_catalog) -> None:
    catalog_path = write_catalog()
    root = f"{bucket['scheme']}://{BUCKET}/values"
    done = _cli(bucket, "build-cube", "--catalog", str(catalog_path), "--root", root, "-q")
    assert done.returncode == 0, done.stderr
    assert f"cube complete: {root}/cube.zarr" in done.stdout
    check = (
        "import numpy as np; from geosoc.catalog import load_catalog; from geosoc.data.cube import open_cube; "
        "from geosoc.sources.from_catalog import open_layers; "
        f"tree = open_cube({root + '/cube.zarr'!r}); assert tree.attrs['geosoc_status'] == 'complete'; "
        f"layers = open_layers(load_catalog(path={str(catalog_path)!r})); "
        "[np.testing.assert_array_equal(tree[l.group].to_dataset()['data'].values, l.lazy().values) for l in layers]; "
        "print('ok')"
    )
    assert bucket_python(bucket, check).startswith("ok")
    assert not any(".progress" in name for name in bucket_listing(bucket, root))


def test_a_lock_on_a_bucket_admits_one_writer(bucket: dict[str, str]) -> None:
    """S3's conditional put and GCS's `ifGenerationMatch=0` make the lock exclusive on a bucket too."""
    url = f"{bucket['scheme']}://{BUCKET}/locked/cube.zarr"
    out = bucket_python(bucket, "from geosoc.io.locks import exclusive\nfrom geosoc.errors import GeosocError\n"
                      f"with exclusive({url!r}, 'build-cube'):\n"
                      "    try:\n"
                      f"        with exclusive({url!r}, 'build-cube'): print('admitted twice')\n"
                      "    except GeosocError as err: print('refused:', err)\n"
                      f"with exclusive({url!r}, 'build-cube'): print('free again')\n")
    assert "refused:" in out and "is writing it" in out and "free again" in out and "twice" not in out


# --- the shipped demo catalog on a bucket: its synthetic AlphaEarth embedding is written and read there too ---------

def test_demo_pipeline_on_a_bucket(bucket: dict[str, str], tmp_path: Path) -> None:
    """`make demo`'s steps with the shipped demo catalog (`--region demo`: its embeddings section included) and
    `--root` on the bucket, on a part of the region and with one epoch: the synthetic AlphaEarth COGs are written
    to the bucket and read back from it by the build's threads (GDAL's own reader: no Python file objects), and
    the embedding reaches the SampleSet and the tree models that read it."""
    root = f"{bucket['scheme']}://{BUCKET}/demo"
    demo = ["--region", "demo", "--root", root]
    points = ["--points", str(demo_points(tmp_path)), "--id-col", "site", "--x-col", "x", "--y-col", "y",
              "--target-col", "soc", "--points-crs", "EPSG:3035"]
    tiny = ["--epochs", "1", "--batch-size", "16"]
    steps: list[tuple[list[str], dict[str, str]]] = [
        (["build-cube", *demo, "--bounds", *DEMO_PART, "--workers", "4", "-q"], {}),
        (["sample", *demo, "--random", "32", "-q"], {}),
        (["sample", *demo, *points, "-q"], {}),
        (["pretrain", *demo, *tiny, "-q"], {}),
        (["finetune", *demo, *tiny, "-q"], {}),
        (["predict", *demo, "--bounds", *MAP_PART, "-q"], {}),
        (["evaluate", *demo, "--models", "rf,aef-rf", "--cv", "random", "--folds", "3", "-q"], {}),
    ]
    for result in _cli_steps(bucket, steps):
        assert result["exit_code"] == 0, f"{result['step']}: {result['output'][-3000:]}"
        assert "testing" not in result["output"]  # no secret in the output
    names = bucket_listing(bucket, root)
    cogs = [name for name in names if re.fullmatch(r"sources/aef-synthetic/seed0-60m-[0-9a-f]{8}/2017/32N/[^/]+\.tiff",
                                                   name)]
    assert len(cogs) == 1 and cogs[0].rsplit("/", 3)[0] + "/_SUCCESS" in names, names
    for expected in ("cube.zarr/zarr.json", "cube.zarr/embeddings/data/zarr.json", "samples/unlabelled.zarr/zarr.json",
                     "samples/labelled.zarr/zarr.json", "models/pretrain/config.json", "models/finetune/config.json",
                     "maps/soc.zarr/zarr.json", "maps/soc_median.tif", "evaluation/summary.json"):
        assert expected in names, expected
    assert not any(part in name for name in names for part in (".partial", ".progress", ".lock", "write-test"))
    check = (
        "import json, dask, fsspec, numpy as np\n"
        "from geosoc.catalog import load_catalog; from geosoc.data.cube import open_cube\n"
        "from geosoc.data.sampling import open_sampleset; from geosoc.sources.from_catalog import open_layers\n"
        f"tree = open_cube({root + '/cube.zarr'!r}); v = tree['embeddings'].to_dataset()['data'].values\n"
        "ok = np.isfinite(v[0]); assert ok.mean() > 0.95, ok.mean()\n"
        "np.testing.assert_allclose(np.sqrt((v[:, ok].astype(float) ** 2).sum(0)), 1, atol=1e-5)\n"
        f"s = open_sampleset({root + '/samples/labelled.zarr'!r})\n"
        "assert np.isfinite(s['embedding'].values).mean() > 0.95\n"
        f"summary = json.loads(fsspec.open({root + '/evaluation/summary.json'!r}).open().read())\n"
        "assert summary['models']['aef-rf']['pooled']['r2'] is not None\n"
        # The COGs on the bucket read by Dask's threaded scheduler, 8 threads, 48 windows, as a build reads them: each
        # window as read alone. (The Python file objects that rasterio's `opener=` handed GDAL failed here every
        # time: `I/O error`, `returned a result with an exception set`, or a segfault on the GCS server.)
        f"catalog = load_catalog('demo', None, {tuple(float(v) for v in DEMO_PART)})\n"
        f"reader = [layer for layer in open_layers(catalog, {root!r}) if layer.group == 'embeddings'][0].reader\n"
        "windows = [(slice(r, r + 8), slice(c, c + 8)) for r in range(0, 48, 8) for c in range(0, 64, 8)]\n"
        "together = dask.compute(*[dask.delayed(reader.read)(*w) for w in windows], scheduler='threads', "
        "num_workers=8)\n"
        "for w, got in zip(windows, together):\n"
        "    np.testing.assert_array_equal(got, reader.read(*w))\n"
        "print('ok', len(together))\n"
    )
    assert bucket_python(bucket, check).startswith("ok 48")


# --- what no command may do: write before its root is checked, create a bucket, or fail with a traceback ----------

def _buckets(bucket: dict[str, str]) -> set[str]:
    """The buckets the server holds now, asked of it directly (S3's ListBuckets, GCS's buckets.list)."""
    if bucket["scheme"] == "s3":
        import boto3

        client = boto3.client("s3", endpoint_url=bucket["FSSPEC_S3_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id=bucket["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=bucket["AWS_SECRET_ACCESS_KEY"])
        return {b["Name"] for b in client.list_buckets()["Buckets"]}
    with urllib.request.urlopen(f"{bucket['STORAGE_EMULATOR_HOST']}/storage/v1/b", timeout=30) as answer:
        return {b["name"] for b in json.load(answer).get("items", [])}


def test_a_missing_bucket_is_refused_by_every_writing_command(bucket: dict[str, str], tmp_path: Path) -> None:
    """Every writing command names the missing bucket in one line, and none creates it (s3fs's makedirs would)."""
    root = f"{bucket['scheme']}://no-such-bucket/demo"
    before = _buckets(bucket)
    commands = writing_commands(root, tmp_path)
    for result in _cli_steps(bucket, [(args, {}) for args in commands], keep_going=True):
        line = one_error_line(result)
        assert f"{bucket['scheme']}://no-such-bucket: no such bucket" in line and "never creates" in line, line
    assert _buckets(bucket) == before == {BUCKET}


def test_a_closed_endpoint_is_one_line_naming_it_and_its_setting(bucket: dict[str, str], tmp_path: Path) -> None:
    """A free port with nothing listening as the endpoint: every writing command says which endpoint it could not
    reach and the setting it came from, at once (no minute of retries), and shows no credential."""
    setting = "FSSPEC_S3_ENDPOINT_URL" if bucket["scheme"] == "s3" else "STORAGE_EMULATOR_HOST"
    endpoint = f"http://127.0.0.1:{free_port()}"
    closed = {**bucket, setting: endpoint}
    commands = writing_commands(f"{bucket['scheme']}://{BUCKET}/closed", tmp_path)
    for result in _cli_steps(closed, [(args, {}) for args in commands], keep_going=True):
        line = one_error_line(result)
        assert f"cannot reach the storage endpoint {endpoint} (set by {setting}): connection refused" in line, line
        assert "testing" not in line
