"""The pipeline on cloud URLs: a real S3 API server (moto) and a GCS JSON API server (tests/gcs_server.py, which
keeps every byte) on loopback, reached through s3fs and gcsfs exactly as users configure them (environment
variables only)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from geosoc.sources.synthetic import Landscape
from tests.helpers import BUCKET, bucket_listing, bucket_python, bucket_settings, tiny_catalog_dict


def _cli(env: dict[str, str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **bucket_settings(env)}
    return subprocess.run([sys.executable, "-m", "geosoc.cli", *args], capture_output=True, text=True, env=full,
                          timeout=timeout)


STEPS = """
import json, os, sys
from typer.testing import CliRunner
from geosoc.cli import app
for step in json.loads(sys.argv[1]):
    os.environ.update(step["env"])
    result = CliRunner().invoke(app, step["args"])
    print(json.dumps({"step": step["args"][0], "exit_code": result.exit_code, "output": result.output}), flush=True)
    if result.exit_code != 0:
        break
"""


def _cli_steps(env: dict[str, str], steps: list[tuple[list[str], dict[str, str]]]) -> list[dict[str, Any]]:
    """CLI commands (args, extra environment) in order, in one fresh interpreter with the bucket's settings: the
    commands' own code paths, one interpreter start instead of one per command."""
    plan = json.dumps([{"args": args, "env": extra} for args, extra in steps])
    done = subprocess.run([sys.executable, "-c", STEPS, plan], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **bucket_settings(env)})
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and len(results) == len(steps), done.stdout[-3000:] + done.stderr[-3000:]
    return results


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


def test_missing_bucket_is_a_clear_error(bucket: dict[str, str], write_catalog) -> None:
    root = f"{bucket['scheme']}://no-such-bucket/tiny"
    done = _cli(bucket, "build-cube", "--catalog", str(write_catalog()), "--root", root, "-q", timeout=120)
    assert done.returncode == 1
    assert f"{root}: cannot write here" in done.stderr and "Traceback" not in done.stderr


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
