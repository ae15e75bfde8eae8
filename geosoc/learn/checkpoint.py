"""Checkpoints at any fsspec URL, each published as one unit.

A checkpoint is a folder whose `config.json` is its manifest: the model config, the run's metadata, and
`files`, which names for each logical file (`model.safetensors`, `state.safetensors`, ...) the
content-addressed object holding it and its SHA-256. A save writes its objects beside the old ones, then
replaces config.json in one step, then deletes the objects nothing names any more. So a reader, or a run
killed at any moment, sees the whole old checkpoint or the whole new one (never weights of one epoch with
the optimizer state of another), and a changed or truncated file is caught by its checksum.

Nothing is pickled: weights and optimizer tensors are safetensors, everything else JSON, so loading an
untrusted checkpoint cannot run code. A damaged checkpoint gives one DamagedError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from geosoc.errors import DamagedError, NotFoundError
from geosoc.io import storage
from geosoc.io.storage import filesystem, join
from geosoc.learn.models import NetworkConfig, SoilNet
from geosoc.learn.normalisation import Normalisation
from geosoc.stats.aoa import Reference

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
STATE_TENSORS, STATE_FILE = "state.safetensors", "state.json"
AOA_FILE = "aoa.safetensors"  # training embeddings for the area of applicability (fine-tuned models)
_OBJECT = re.compile(r"[\w-]+\.[0-9a-f]{16}\.\w+")  # <stem>.<digest>.<ext>: what a save writes
_TEMPORARY = re.compile(r".+\.tmp-[0-9a-f]{8}")  # a local write a killed run left (storage.put_bytes)
FRESH_HINT = "train again with --fresh, or point at another checkpoint"


def is_checkpoint(url: str) -> bool:
    """Whether a checkpoint is at `url` (its config.json is published last)."""
    return storage.exists(join(url, CONFIG_FILE))


def _json(where: str, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedError(f"{where}: not valid JSON ({err}); {FRESH_HINT}") from err


def _config_raw(url: str) -> bytes:
    fs, path = filesystem(join(url, CONFIG_FILE))
    try:
        return fs.cat_file(path)
    except FileNotFoundError as err:
        raise NotFoundError(f"{url}: no {CONFIG_FILE} here (is this a geosoc checkpoint?)") from err


def _document(url: str, raw: bytes | None = None) -> dict[str, Any]:
    """config.json (`raw`, or read from `url`), parsed and checked for the entries every checkpoint has."""
    where = join(url, CONFIG_FILE)
    document = _json(where, _config_raw(url) if raw is None else raw)
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise DamagedError(f"{where}: expected an object with a 'model' entry (the network's config); {FRESH_HINT}")
    files = document.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("object"), str) and _OBJECT.fullmatch(entry["object"])
        and isinstance(entry.get("sha256"), str) for entry in files.values()
    ):
        raise DamagedError(f"{where}: 'files' must map each file to its object and sha256; {FRESH_HINT}")
    return document


def _object_name(name: str, digest: str) -> str:
    stem, _, extension = name.partition(".")
    return f"{stem}.{digest[:16]}.{extension}"


def _publish(url: str, document: dict[str, Any], new_files: dict[str, bytes]) -> None:
    """Objects first, then the manifest in one step, then the objects it no longer names."""
    files = dict(document.get("files", {}))
    for name, data in new_files.items():
        digest = hashlib.sha256(data).hexdigest()
        files[name] = {"object": _object_name(name, digest), "sha256": digest, "bytes": len(data)}
        storage.put_bytes(join(url, files[name]["object"]), data)
    storage.put_bytes(join(url, CONFIG_FILE), json.dumps({**document, "files": files}, indent=2).encode())
    keep = {entry["object"] for entry in files.values()}
    fs, path = filesystem(url)
    for found in fs.ls(path, detail=False):
        name = found.rstrip("/").rsplit("/", 1)[-1]
        if (_OBJECT.fullmatch(name) and name not in keep) or _TEMPORARY.fullmatch(name):
            fs.rm_file(found)


def read_file(url: str, name: str, document: dict[str, Any] | None = None) -> bytes:
    """One file of a checkpoint, checked against the manifest's checksum (`document`: config.json already
    read), with a clear error when it is not there."""
    document = _document(url) if document is None else document
    if "files" not in document:  # written before checkpoints had a manifest
        fs, path = filesystem(join(url, name))
        try:
            return fs.cat_file(path)
        except FileNotFoundError as err:
            raise NotFoundError(f"{url}: no {name} here; {FRESH_HINT}") from err
    entry = document["files"].get(name)
    if entry is None:
        raise DamagedError(f"{join(url, CONFIG_FILE)}: the checkpoint has no {name}; {FRESH_HINT}")
    where = join(url, entry["object"])
    fs, path = filesystem(where)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError as err:
        raise NotFoundError(f"{where}: missing ({name} of this checkpoint); {FRESH_HINT}") from err
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DamagedError(f"{where}: does not match its checksum in {CONFIG_FILE} (changed or truncated); "
                           f"{FRESH_HINT}")
    return data


def _tensors(url: str, name: str, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_tensors(data)
    except SafetensorError as err:
        raise DamagedError(f"{join(url, name)}: not a safetensors file ({err}); {FRESH_HINT}") from err


def has_file(url: str, name: str, document: dict[str, Any] | None = None) -> bool:
    """Whether the checkpoint at `url` holds `name` (e.g. the area-of-applicability reference)."""
    document = _document(url) if document is None else document
    if "files" not in document:
        return storage.exists(join(url, name))
    return name in document["files"]


def weights_bytes(model: torch.nn.Module) -> bytes:
    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    return save_tensors({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})


def save_model(url: str, model: torch.nn.Module, config: NetworkConfig, meta: dict[str, Any],
               optimizer: torch.optim.Optimizer | None = None, info: dict[str, Any] | None = None) -> None:
    """The weights, and with `optimizer` a resumable state (its tensors and `info`: epoch, history), as one unit."""
    files = {MODEL_FILE: weights_bytes(model)}
    if optimizer is not None:
        files.update(_state_files(optimizer, info or {}))
    save_files(url, files, config, meta)


def save_files(url: str, files: dict[str, bytes], config: NetworkConfig, meta: dict[str, Any]) -> None:
    """A whole new checkpoint of `files` (e.g. a tree model's estimators instead of weights), replacing any
    earlier one at `url` as one unit."""
    meta = {k: v for k, v in meta.items() if k not in ("model", "files")}
    _publish(url, {"model": config.to_dict(), **meta, "files": {}}, files)


def update_meta(url: str, updates: dict[str, Any]) -> None:
    """Add entries to a saved checkpoint's config.json (e.g. the calibration fitted after training)."""
    _publish(url, {**_document(url), **updates}, {})


def save_aoa(url: str, reference: Reference) -> None:
    _publish(url, _document(url), {AOA_FILE: reference.to_bytes()})


def load_aoa(url: str) -> Reference | None:
    """The area-of-applicability reference stored with a fine-tuned model, or None if it has none."""
    document = _document(url)
    if not has_file(url, AOA_FILE, document):
        return None
    data = read_file(url, AOA_FILE, document)
    try:
        return Reference.from_bytes(data)
    except (ValueError, KeyError, SafetensorError) as err:
        raise DamagedError(f"{join(url, AOA_FILE)}: not an area-of-applicability reference ({err}); "
                           f"{FRESH_HINT}") from err


def config_bytes(url: str) -> bytes:
    """config.json as stored (what identifies a checkpoint's contents and checksums, e.g. in a map's fingerprint)."""
    raw = _config_raw(url)
    _document(url, raw)
    return raw


def calibration_of(url_or_meta: str | dict[str, Any]) -> dict[str, Any]:
    """The conformal calibration recorded in a checkpoint's config.json ({} when it has none)."""
    meta = load_config(url_or_meta)[1] if isinstance(url_or_meta, str) else url_or_meta
    return dict(meta.get("calibration") or {})


def offset_of(meta: dict[str, Any]) -> float:
    """The CQR offset to apply to a checkpoint's interval (0 when it was never calibrated)."""
    return float(calibration_of(meta).get("offset", 0.0))


def load_config(url: str) -> tuple[NetworkConfig, dict[str, Any]]:
    """The model config and the rest of config.json (without its file list), without reading the weights."""
    return _config_of(_document(url))


def _config_of(document: dict[str, Any]) -> tuple[NetworkConfig, dict[str, Any]]:
    meta = {k: v for k, v in document.items() if k not in ("model", "files")}
    return NetworkConfig.from_dict(document["model"]), meta


def normalisation(url: str, meta: dict[str, Any]) -> Normalisation:
    """The input and target scaling recorded in a checkpoint's config.json."""
    try:
        return Normalisation.from_dict(meta["normalisation"])
    except (KeyError, ValueError) as err:
        raise DamagedError(f"{join(url, CONFIG_FILE)}: 'normalisation' is missing or malformed ({err}); "
                           f"{FRESH_HINT}") from err


def _build_model(url: str, config: NetworkConfig) -> SoilNet:
    """The network a checkpoint's config describes (untrained)."""
    try:
        return SoilNet(config)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise DamagedError(f"{join(url, CONFIG_FILE)}: 'model' does not describe a network ({err}); "
                           f"{FRESH_HINT}") from err


def fit_weights(url: str, module: torch.nn.Module, weights: dict[str, torch.Tensor], skip: str | None = None) -> None:
    """Load `weights` into `module`; every parameter must match by name and shape (those under `skip` apart)."""
    if skip is not None:
        weights = {k: v for k, v in weights.items() if not k.startswith(skip)}
    try:
        result = module.load_state_dict(weights, strict=skip is None)
    except RuntimeError as err:
        details = " ".join(str(err).split())[:400]
        raise DamagedError(f"{join(url, MODEL_FILE)}: the weights do not fit the network in {CONFIG_FILE} "
                           f"({details}); {FRESH_HINT}") from err
    missing = [k for k in result.missing_keys if skip is None or not k.startswith(skip)]
    if missing or result.unexpected_keys:
        raise DamagedError(f"{join(url, MODEL_FILE)}: the weights do not fit the network in {CONFIG_FILE} "
                           f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}); {FRESH_HINT}")


def load_model(url: str, device: str | torch.device = "cpu") -> tuple[SoilNet, dict[str, Any]]:
    """The model (eval mode) and the rest of config.json (normalisation, target transform, metrics)."""
    document = _document(url)
    config, meta = _config_of(document)
    normalisation(url, meta)
    model = _build_model(url, config)
    fit_weights(url, model, _tensors(url, MODEL_FILE, read_file(url, MODEL_FILE, document)))
    return model.to(device).eval(), meta


def load_weights(url: str) -> dict[str, torch.Tensor]:
    return _tensors(url, MODEL_FILE, read_file(url, MODEL_FILE))


def _state_files(optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> dict[str, bytes]:
    """Optimizer tensors flattened into safetensors, its structure and `info` (epoch, history) as JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    structure: dict[str, dict[str, Any]] = {}
    for param, values in state["state"].items():
        structure[str(param)] = {}
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{param}.{name}"] = value.detach().cpu().contiguous()
                structure[str(param)][name] = None
            else:
                structure[str(param)][name] = value
    return {STATE_TENSORS: save_tensors(tensors),
            STATE_FILE: json.dumps({"param_groups": state["param_groups"], "state": structure, **info}).encode()}


def _state(url: str) -> dict[str, Any]:
    state = _json(join(url, STATE_FILE), read_file(url, STATE_FILE))
    needed = {"param_groups": list, "state": dict, "epoch": int, "history": list}
    if not isinstance(state, dict) or not all(isinstance(state.get(k), kind) for k, kind in needed.items()):
        raise DamagedError(f"{join(url, STATE_FILE)}: expected an object with {sorted(needed)}; {FRESH_HINT}")
    return state


def state_info(url: str) -> dict[str, Any]:
    """The saved `info` of a resumable state (epoch, history, run), without touching an optimizer."""
    return {k: v for k, v in _state(url).items() if k not in ("param_groups", "state")}


def load_state(url: str, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimizer; return the saved `info`."""
    info = _state(url)
    tensors = _tensors(url, STATE_TENSORS, read_file(url, STATE_TENSORS))
    # How the optimizer runs (fused on CUDA, or not) belongs to this process's device, not to the saved run.
    how = ("fused", "foreach", "capturable", "differentiable")
    try:
        state = {
            int(param): {name: tensors[f"{param}.{name}"] if value is None else value for name, value in values.items()}
            for param, values in info.pop("state").items()
        }
        groups = [{**saved, **{k: current[k] for k in how if k in current}}
                  for saved, current in zip(info.pop("param_groups"), optimizer.param_groups, strict=True)]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise DamagedError(f"{url}: the optimizer state does not fit this model ({type(err).__name__}: {err}); "
                           f"{FRESH_HINT}") from err
    return info
