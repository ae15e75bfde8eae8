"""Damaged and hostile model files (issue 21, item 4): a tree model's skops file, a network's safetensors, the
config.json manifests, the area-of-applicability references. Each is one `error:` line naming the file, before
any work, and nothing in them ever runs: the shapes a sweep found as a table through the CLI, then a seeded fuzz
of byte flips and truncations of every file of a real checkpoint through the in-process loader."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from geosoc.catalog import load_catalog
from geosoc.cli import app
from geosoc.errors import DamagedError, GeosocError, NotFoundError
from geosoc.learn import baselines, checkpoint
from geosoc.maps.predictor import load_predictor
from geosoc.maps.tabular import ESTIMATOR_FILE, fit_region
from tests.helpers import _object, _rewrite_config, copy_region, files_state

MARKER = "hostile-code-ran"  # what the hostile files below would create, in the region's folder, if they ran


@pytest.fixture(scope="module")
def region(trained_region: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The trained region with a small random forest fitted beside its network (models/rf): both real
    checkpoints, made once for the module."""
    catalog, root = copy_region(trained_region, tmp_path_factory.mktemp("damaged-models"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(baselines, "TREES", 5)
        fit_region(load_catalog(path=catalog).config, root, "rf")
    return catalog, root


def _replace(url: str, name: str, data: bytes, publish: bool = True) -> None:
    """`name` of the checkpoint at `url` holds `data`; `publish`: its checksum in config.json updated to match (as a
    deliberate tamperer would), so that what reads the file, not the checksum, meets it."""
    _object(url, name).write_bytes(data)
    if publish:
        _rewrite_config(url, lambda d: d["files"][name].update(sha256=hashlib.sha256(data).hexdigest()))


class _Hostile:
    """Unpickled, it would run a shell command that leaves MARKER in the current folder."""

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return os.system, (f"touch {MARKER}",)


def _rezipped(data: bytes, change: Callable[[dict[str, bytes]], None]) -> bytes:
    """A skops file (a zip) with its members changed by `change` (name -> bytes, schema.json among them)."""
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        members = {name: source.read(name) for name in source.namelist()}
    change(members)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for name, content in members.items():
            target.writestr(name, content)
    return out.getvalue()


def _schema_change(change: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def apply(members: dict[str, bytes]) -> None:
        schema = json.loads(members["schema.json"])
        change(schema)
        members["schema.json"] = json.dumps(schema).encode()

    return lambda data: _rezipped(data, apply)


def _system_without_key_types(_: bytes) -> bytes:
    """A skops file holding os.system whose top-level dict lacks `key_types` (skops met a KeyError)."""
    import skops.io

    return _schema_change(lambda schema: schema.pop("key_types"))(skops.io.dumps({"estimators": [os.system]}))


def _system(_: bytes) -> bytes:
    import skops.io

    return skops.io.dumps({"estimators": [os.system]})


def _no_estimators(_: bytes) -> bytes:
    import skops.io

    return skops.io.dumps({"estimators": []})


SKOPS: dict[str, tuple[Callable[[bytes], bytes], str]] = {  # the good file -> the bad one, what the error says
    "a pickle in its place": (lambda _: pickle.dumps(_Hostile()), "not a skops file"),
    "a schema without key_types, holding os.system": (_system_without_key_types, "KeyError: 'key_types'"),
    "a well-formed file holding os.system": (_system, "refusing to load it"),
    "an unknown loader": (_schema_change(lambda schema: schema.update({"__loader__": "HostileNode"})),
                          "not a skops file"),
    "protocol 999": (_schema_change(lambda schema: schema.update(protocol=999)), "not a skops file"),
    "a zip without schema.json": (lambda data: _rezipped(data, lambda members: members.pop("schema.json")),
                                  "not a skops file"),
    "a schema that is not JSON": (lambda data: _rezipped(data, lambda members: members.update(
        {"schema.json": b"{ not json"})), "JSONDecodeError"),
    "no bytes at all": (lambda _: b"", "empty"),
    "no estimators": (_no_estimators, "0 estimators, a rf model has 1"),
}


def _predict(catalog: Path, root: str, *args: str) -> tuple[int, str]:
    """`geosoc predict` as a user runs it, in this process; its exit code and output."""
    result = CliRunner().invoke(app, ["predict", "--catalog", str(catalog), "--root", root, "-q", *args])
    return result.exit_code, result.output


def _assert_one_error(code: int, output: str, start: str, says: str) -> None:
    """Exit 1, no traceback, and a last line `error: <start>...` that says `says` (words joined by one space:
    the console wraps long paths)."""
    last = " ".join(output.strip().split("\n")[-1].split())
    assert code == 1 and "Traceback" not in output, output[-3000:]
    assert last.startswith(f"error: {start}") and says in " ".join(output.split()), output[-3000:]


@pytest.mark.parametrize("case", list(SKOPS))
def test_a_damaged_or_hostile_tree_model_is_one_error_and_nothing_runs(case: str, region: tuple[Path, str],
                                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                      ) -> None:
    catalog, root = copy_region(region, tmp_path / "copy")
    url = f"{root}/models/rf"
    damage, says = SKOPS[case]
    _replace(url, ESTIMATOR_FILE, damage(_object(url, ESTIMATOR_FILE).read_bytes()))
    monkeypatch.chdir(tmp_path)  # where MARKER would appear
    before = files_state(tmp_path)
    _assert_one_error(*_predict(catalog, root, "--model", "rf"), f"{url}/{ESTIMATOR_FILE}", says)
    assert files_state(tmp_path) == before and not (tmp_path / MARKER).exists()


def test_a_config_whose_patch_size_disagrees_with_the_weights_is_refused_before_any_work(
        region: tuple[Path, str], tmp_path: Path) -> None:
    """The tiny region's 8 px patches of 4 px tokens, said to be 4 px (as 32 -> 16 was on the demo's)."""
    catalog, root = copy_region(region, tmp_path / "copy")
    url = f"{root}/models/finetune"
    _rewrite_config(url, lambda d: d["model"].update(patch_size=4))
    before = files_state(tmp_path)
    _assert_one_error(*_predict(catalog, root), f"{url}/config.json: 'patch_size' is 4",
                      "holds a network for 2 x 2 tokens (patches of 8 px)")
    assert files_state(tmp_path) == before


CONFIG_EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {  # config.json edit, what the error names
    "patch size": (lambda d: d["model"].update(patch_size=16), "'patch_size' is 16"),
    "image depth": (lambda d: d["model"].update(image_depth=1000), "'image_depth' is 1000"),
    "one band less": (lambda d: d["model"]["bands"].pop(), "'normalisation' has 14 band means for the 13"),
    "no-data mask switched off": (lambda d: d["model"].update(nodata_mask=False),
                                  "'bands' has 14 entries, but model.safetensors holds a network of 15 input"),
    "centre pixel switched off": (lambda d: d["model"].update(centre_pixel=False),
                                  "'centre_pixel' is false, but model.safetensors holds a head reading 28"),
    "another embedding": (lambda d: d["model"].update(embedding=8), "'embedding' is 8"),
    "a fourth quantile": (lambda d: d["model"].update(quantiles=[0.05, 0.25, 0.5, 0.95]), "'quantiles' has 4"),
    "months beyond reason": (lambda d: d["model"].update(months=10**9), "'months' is 1000000000"),
    "heads of text": (lambda d: d["model"].update(climate_heads="2"), "'climate_heads' must be a whole number"),
    "zero heads": (lambda d: d["model"].update(image_heads=0), "'image_heads' must be a whole number"),
    "quantiles out of order": (lambda d: d["model"].update(quantiles=[0.5, 0.05, 0.95]), "'quantiles' must be"),
    "a zero standard deviation": (lambda d: d["normalisation"]["band_std"].__setitem__(0, 0.0),
                                  "standard deviations finite and positive"),
    "a NaN target scale": (lambda d: d["normalisation"].update(target_std=float("nan")),
                           "standard deviations finite and positive"),
    "scaling for fewer bands": (lambda d: [d["normalisation"][k].pop() for k in ("band_mean", "band_std")],
                                "'normalisation' has 13 band means"),
    "an unknown stage": (lambda d: d.update(stage="finetunf"), "'stage' is 'finetunf'"),
    "a calibration of text": (lambda d: d.update(calibration={"offset": "0.1"}), "'calibration' must be"),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_a_config_edit_is_refused_naming_config_json_and_the_entry(case: str, region: tuple[Path, str],
                                                                   tmp_path: Path) -> None:
    url = str(tmp_path / "finetune")
    shutil.copytree(f"{region[1]}/models/finetune", url)
    change, says = CONFIG_EDITS[case]
    _rewrite_config(url, change)
    for load in (checkpoint.load_config, load_predictor):  # what every step reads first, and the map's model
        with pytest.raises(DamagedError) as raised:
            load(url)
        assert str(raised.value).startswith(f"{url}/config.json: ") and says in str(raised.value)


# --- fuzz: random byte flips and truncations of each file of a real network and a real tree model ---------------

FILES = [("finetune", "config.json"), ("finetune", checkpoint.MODEL_FILE), ("finetune", checkpoint.AOA_FILE),
         ("rf", "config.json"), ("rf", ESTIMATOR_FILE), ("rf", checkpoint.AOA_FILE)]
CASES = 50  # per file: 300 in all


def _damaged(data: bytes, rng: random.Random) -> bytes:
    """`data` with one byte flipped or cut short; half the time within its first or last 512 bytes, where the
    headers are (safetensors' at the start, a zip's directory at the end)."""
    size = len(data)
    edge = rng.random() < 0.5
    at = rng.choice([rng.randrange(min(512, size)), size - 1 - rng.randrange(min(512, size))]) if edge else (
        rng.randrange(size))
    if rng.random() < 0.3:
        return data[:at]
    return data[:at] + bytes([data[at] ^ rng.randrange(1, 256)]) + data[at + 1 :]


def _names(url: str, name: str) -> set[str] | None:
    """The names a message about damage to `name` may give the file by: its own, its object's, config.json's
    (whose entries it may disagree with). None for config.json itself: a damaged manifest may name any file."""
    if name == "config.json":
        return None
    return {"config.json", name, json.loads(Path(url, "config.json").read_text())["files"][name]["object"]}


def _assert_loads_or_one_clear_error(url: str, names: set[str] | None) -> None:
    """The map's model loads, or fails with one line naming a file of its checkpoint (one of `names` if given),
    never with another exception."""
    try:
        load_predictor(url, "cpu")
    except (DamagedError, NotFoundError) as err:
        message = str(err)
        named = Path(message.split(": ", 1)[0])
        assert "\n" not in message and named.parent == Path(url), message
        assert names is None or named.name in names, message
    except GeosocError as err:
        raise AssertionError(f"another kind of error: {type(err).__name__}: {err}") from err


@pytest.mark.parametrize("model,name", FILES)
def test_random_damage_to_any_model_file_loads_or_is_one_clear_error(model: str, name: str,
                                                                     region: tuple[Path, str]) -> None:
    """Flips and truncations with the manifest's checksum updated to match (mostly: the parsers meet them), and
    without (the checksum meets them); config.json has no checksum. Each file is put back after each case."""
    url = f"{region[1]}/models/{model}"
    manifest = Path(url, "config.json").read_bytes()
    path = Path(url, name) if name == "config.json" else _object(url, name)
    good, names = path.read_bytes(), _names(url, name)
    rng = random.Random(f"{model}/{name}")
    try:
        for _ in range(CASES):
            if name == "config.json":
                path.write_bytes(_damaged(good, rng))
            else:
                _replace(url, name, _damaged(good, rng), publish=rng.random() < 0.8)
            _assert_loads_or_one_clear_error(url, names)
            path.write_bytes(good)
            Path(url, "config.json").write_bytes(manifest)
    finally:
        path.write_bytes(good)
        Path(url, "config.json").write_bytes(manifest)
    load_predictor(url, "cpu")  # the good one, put back, loads
