"""Checkpoints at any fsspec URL: `model.safetensors` + `config.json`, and a resumable `last/` state.

Nothing is pickled: weights and optimizer tensors are safetensors, everything else JSON, so loading an
untrusted checkpoint cannot run code.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from geosoc.aoa import Reference
from geosoc.errors import GeosocError
from geosoc.models import ModelConfig, SoilNet
from geosoc import storage
from geosoc.storage import filesystem, join

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
STATE_TENSORS, STATE_FILE = "state.safetensors", "state.json"
AOA_FILE = "aoa.safetensors"  # training embeddings for the area of applicability (fine-tuned models)


def _write(url: str, name: str, data: bytes) -> None:
    fs, path = filesystem(join(url, name))
    fs.pipe_file(path, data)


def _read(url: str, name: str) -> bytes:
    fs, path = filesystem(join(url, name))
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise GeosocError(f"{url}: no {name} here (is this a geosoc checkpoint?)") from None


def exists(url: str) -> bool:
    """Whether a (complete) checkpoint is at `url`: config.json is written last."""
    return storage.exists(join(url, CONFIG_FILE))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_model(url: str, model: torch.nn.Module, config: ModelConfig, meta: dict[str, Any]) -> None:
    """Weights, then config.json last: a checkpoint with a config.json is complete."""
    save_files(url, {MODEL_FILE: save_tensors(_weights(model))}, config, meta)


def save_files(url: str, files: dict[str, bytes], config: ModelConfig, meta: dict[str, Any]) -> None:
    """A checkpoint's files, then its config.json last (e.g. a tree model's estimators instead of weights)."""
    for name, data in files.items():
        _write(url, name, data)
    _write(url, CONFIG_FILE, json.dumps({"model": config.to_dict(), **meta}, indent=2).encode())


def read_file(url: str, name: str) -> bytes:
    """One file of a checkpoint, with a clear error when it is not there."""
    return _read(url, name)


def update_meta(url: str, updates: dict[str, Any]) -> None:
    """Add entries to a saved checkpoint's config.json (e.g. the calibration fitted after training)."""
    meta = json.loads(_read(url, CONFIG_FILE))
    meta.update(updates)
    _write(url, CONFIG_FILE, json.dumps(meta, indent=2).encode())


def save_aoa(url: str, reference: Reference) -> None:
    _write(url, AOA_FILE, reference.to_bytes())


def load_aoa(url: str) -> Reference | None:
    """The area-of-applicability reference stored with a fine-tuned model, or None if it has none."""
    return Reference.from_bytes(_read(url, AOA_FILE)) if storage.exists(join(url, AOA_FILE)) else None


def config_bytes(url: str) -> bytes:
    """config.json as stored (what identifies a checkpoint's contents, e.g. in a map's fingerprint)."""
    return _read(url, CONFIG_FILE)


def calibration_of(url_or_meta: str | dict[str, Any]) -> dict[str, Any]:
    """The conformal calibration recorded in a checkpoint's config.json ({} when it has none)."""
    meta = load_config(url_or_meta)[1] if isinstance(url_or_meta, str) else url_or_meta
    return dict(meta.get("calibration") or {})


def offset_of(meta: dict[str, Any]) -> float:
    """The CQR offset to apply to a checkpoint's interval (0 when it was never calibrated)."""
    return float(calibration_of(meta).get("offset", 0.0))


def load_config(url: str) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and the rest of config.json, without reading the weights."""
    meta = json.loads(_read(url, CONFIG_FILE))
    return ModelConfig.from_dict(meta.pop("model")), meta


def load_model(url: str, device: str | torch.device = "cpu") -> tuple[SoilNet, dict[str, Any]]:
    """The model (eval mode) and the rest of config.json (normalisation, target transform, metrics)."""
    config, meta = load_config(url)
    model = SoilNet(config)
    model.load_state_dict(load_tensors(_read(url, MODEL_FILE)))
    return model.to(device).eval(), meta


def load_weights(url: str) -> dict[str, torch.Tensor]:
    return load_tensors(_read(url, MODEL_FILE))


def save_state(url: str, optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> None:
    """Optimizer tensors flattened into safetensors, its structure and `info` (epoch, history) as JSON."""
    state = optimizer.state_dict()
    tensors, structure = {}, {}
    for param, values in state["state"].items():
        structure[str(param)] = {}
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{param}.{name}"] = value.detach().cpu().contiguous()
                structure[str(param)][name] = None
            else:
                structure[str(param)][name] = value
    _write(url, STATE_TENSORS, save_tensors(tensors))
    _write(url, STATE_FILE, json.dumps({"param_groups": state["param_groups"], "state": structure, **info}).encode())


def state_info(url: str) -> dict[str, Any]:
    """The saved `info` of a resumable state (epoch, history, run), without touching an optimizer."""
    info = json.loads(_read(url, STATE_FILE))
    return {k: v for k, v in info.items() if k not in ("param_groups", "state")}


def load_state(url: str, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimizer; return the saved `info`."""
    info = json.loads(_read(url, STATE_FILE))
    tensors = load_tensors(_read(url, STATE_TENSORS))
    state = {
        int(param): {name: tensors[f"{param}.{name}"] if value is None else value for name, value in values.items()}
        for param, values in info.pop("state").items()
    }
    # How the optimizer runs (fused on CUDA, or not) belongs to this process's device, not to the saved run.
    how = ("fused", "foreach", "capturable", "differentiable")
    groups = [{**saved, **{k: current[k] for k in how if k in current}}
              for saved, current in zip(info.pop("param_groups"), optimizer.param_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return info
