"""Checkpoints at any fsspec URL, each published as one unit.

A checkpoint is a folder whose `config.json` is its manifest: the model config, the run's metadata, and
`files`, which names for each logical file (`model.safetensors`, `state.safetensors`, ...) the
content-addressed object holding it and its SHA-256. A save writes its objects beside the old ones, then
replaces config.json in one step, then deletes the objects nothing names any more. So a reader, or a run
killed at any moment, sees the whole old checkpoint or the whole new one (never weights of one epoch with
the optimizer state of another), and a changed or truncated file is caught by its checksum.

Nothing is pickled: weights and optimizer tensors are safetensors, everything else JSON, so loading an
untrusted checkpoint cannot run code. A damaged checkpoint gives one DamagedError naming the file, and so does a
config.json with an entry of the wrong kind or range, or a network other than the one its weights are of (checked
against the weights' header by `load_config`, before any step builds or runs anything from it).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from geosoc.errors import DamagedError, NotFoundError, first_line
from geosoc.io import storage
from geosoc.io.storage import filesystem, join
from geosoc.learn.models import NetworkConfig, SoilNet
from geosoc.learn.models.soilnet import head_inputs
from geosoc.learn.normalisation import Normalisation
from geosoc.stats.aoa import Reference

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
STATE_TENSORS, STATE_FILE = "state.safetensors", "state.json"
AOA_FILE = "aoa.safetensors"  # training embeddings for the area of applicability (fine-tuned models)
_OBJECT = re.compile(r"[\w-]+\.[0-9a-f]{16}\.\w+")  # <stem>.<digest>.<ext>: what a save writes
_TEMPORARY = re.compile(r".+\.tmp-[0-9a-f]{8}")  # a local write a killed run left (storage.put_bytes)
FRESH_HINT = "train again with --fresh, or point at another checkpoint"
STAGES = ("pretrain", "finetune", "fit-tabular")  # what a checkpoint's "stage" can be
IMAGE_SIZES = ("patch_size", "image_patch", "image_dim", "image_depth", "image_heads")  # at least 1 with bands
CLIMATE_SIZES = ("months", "climate_dim", "climate_layers", "climate_heads", "climate_feedforward")  # with variables
SHARED_SIZES = ("embedding", "head_hidden")
MAX_MONTHS = 12_000  # a thousand years of months: a longer series is a damaged config (its positions are allocated)
MAX_HEADER = 100_000_000  # bytes: the largest safetensors header (safetensors' own limit)


def is_tabular(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's config.json (its meta) is a tree model's (`geosoc fit-tabular`)."""
    return meta.get("kind") == "tabular"


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


def _location(url: str, name: str, document: dict[str, Any]) -> str:
    """Where the file `name` of a checkpoint is: the object its manifest names (the file itself in a checkpoint
    written before checkpoints had a manifest)."""
    if "files" not in document:
        return join(url, name)
    entry = document["files"].get(name)
    if entry is None:
        raise DamagedError(f"{join(url, CONFIG_FILE)}: the checkpoint has no {name}; {FRESH_HINT}")
    return join(url, entry["object"])


def read_file(url: str, name: str, document: dict[str, Any] | None = None) -> bytes:
    """One file of a checkpoint, checked against the manifest's checksum (`document`: config.json already
    read), with a clear error when it is not there."""
    document = _document(url) if document is None else document
    where = _location(url, name, document)
    fs, path = filesystem(where)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError as err:
        raise NotFoundError(f"{where}: missing ({name} of this checkpoint); {FRESH_HINT}") from err
    entry = document.get("files", {}).get(name)
    if entry is not None and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DamagedError(f"{where}: does not match its checksum in {CONFIG_FILE} (changed or truncated); "
                           f"{FRESH_HINT}")
    return data


def _tensors(url: str, name: str, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_tensors(data)
    except Exception as err:  # the parse of the file's bytes alone: safetensors and torch raise several kinds
        raise DamagedError(f"{join(url, name)}: not a safetensors file ({type(err).__name__}: {first_line(err)}); "
                           f"{FRESH_HINT}") from err


def _header_shapes(url: str, document: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensor shapes in model.safetensors from its header alone (8 bytes of length, then JSON): what a config
    is checked against without reading the weights (the whole file, checksum included, is read to load them)."""
    where = _location(url, MODEL_FILE, document)
    fs, path = filesystem(where)
    try:
        with fs.open(path, "rb") as file:
            length = int.from_bytes(file.read(8), "little")
            raw = file.read(length) if length <= MAX_HEADER else b""
    except FileNotFoundError as err:
        raise NotFoundError(f"{where}: missing ({MODEL_FILE} of this checkpoint); {FRESH_HINT}") from err
    try:
        return _shapes_in(json.loads(raw))
    except ValueError as err:  # also what json raises for text that is not JSON or not UTF-8
        raise DamagedError(f"{where}: not a safetensors file (its header: {first_line(err)}); {FRESH_HINT}") from err


def _shapes_in(header: Any) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a parsed safetensors header; ValueError when it is not one."""
    if not isinstance(header, dict):
        raise ValueError("not a JSON object")
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                  for n in shape):
            raise ValueError(f"no shape for {name!r}")
        shapes[name] = tuple(shape)
    return shapes


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


def load_aoa(url: str, features: int | None = None) -> Reference | None:
    """The area-of-applicability reference stored with a map model, or None if it has none. Its embeddings must
    have the model's `features` (default: a network's, from config.json; a tree model's loader passes its own)."""
    document = _document(url)
    if not has_file(url, AOA_FILE, document):
        return None
    data = read_file(url, AOA_FILE, document)
    where = join(url, AOA_FILE)
    try:
        reference = Reference.from_bytes(data)
    except ValueError as err:
        raise DamagedError(f"{where}: not an area-of-applicability reference ({err}); {FRESH_HINT}") from err
    if features is None and document.get("kind") != "tabular":
        config = _config_of(url, document)[0]
        features = head_inputs(config)
    if features is not None and reference.embeddings.shape[1] != features:
        raise DamagedError(f"{where}: embeddings of {reference.embeddings.shape[1]} features, but the model in "
                           f"{CONFIG_FILE} has {features}; {FRESH_HINT}")
    return reference


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
    """The model config and the rest of config.json (without its file list), each entry checked, and a network's
    config against the shapes in its weights' header (not the weights): a damaged or hand-edited config.json is
    refused here, before any step builds or runs anything from it."""
    document = _document(url)
    config, meta = _config_of(url, document)
    if document.get("kind") != "tabular" and has_file(url, MODEL_FILE, document):
        _check_fits(url, config, _header_shapes(url, document))
    return config, meta


def _config_of(url: str, document: dict[str, Any]) -> tuple[NetworkConfig, dict[str, Any]]:
    """The network config and the rest of config.json, every entry a loader uses of the kind and range it needs."""
    meta = {k: v for k, v in document.items() if k not in ("model", "files")}
    config = NetworkConfig.from_dict(document["model"])
    problem = _config_problem(config)
    if problem is not None:
        raise DamagedError(f"{join(url, CONFIG_FILE)}: 'model' does not describe a network ({problem}); "
                           f"{FRESH_HINT}")
    problem = _meta_problem(url, config, meta)
    if problem is not None:
        raise DamagedError(f"{join(url, CONFIG_FILE)}: {problem}; {FRESH_HINT}")
    return config, meta


def _config_problem(config: NetworkConfig) -> str | None:
    """What makes a 'model' entry no network geosoc builds (None when nothing does): checked before a network is
    built from it, so that a damaged entry is this error rather than an absurd allocation or a failure later."""
    for name in ("bands", "variables"):
        names = getattr(config, name)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return f"'{name}' must be a list of names, got {names!r}"
    if not config.bands and not config.variables:
        return "it needs 'bands', 'variables' or both"
    for flag in ("nodata_mask", "centre_pixel"):
        if not isinstance(getattr(config, flag), bool):
            return f"'{flag}' must be true or false, got {getattr(config, flag)!r}"
    needed = (*SHARED_SIZES, *(IMAGE_SIZES if config.bands else ()), *(CLIMATE_SIZES if config.variables else ()))
    for name in (*SHARED_SIZES, *IMAGE_SIZES, *CLIMATE_SIZES):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < int(name in needed):
            return f"'{name}' must be a whole number of at least {int(name in needed)}, got {value!r}"
    if config.months > MAX_MONTHS:
        return f"'months' is {config.months}, more than {MAX_MONTHS}"
    for dim, heads, branch in (("image_dim", "image_heads", config.bands), ("climate_dim", "climate_heads",
                                                                           config.variables)):
        if branch and getattr(config, dim) % getattr(config, heads):
            return f"'{heads}' ({getattr(config, heads)}) must divide '{dim}' ({getattr(config, dim)})"
    return _quantiles_problem(config.quantiles)


def _quantiles_problem(quantiles: Any) -> str | None:
    """The head's quantiles must be increasing fractions, each its own percentage (a map's soc_qXX name)."""
    if (isinstance(quantiles, list) and quantiles and all(is_number(q) and 0 < q < 1 for q in quantiles)
            and quantiles == sorted(set(quantiles)) and len({round(q * 100) for q in quantiles}) == len(quantiles)):
        return None
    return f"'quantiles' must be increasing fractions between 0 and 1, each a different percentage, got {quantiles!r}"


def is_number(value: Any) -> bool:
    """A finite JSON number (JSON as Python reads it also has NaN and Infinity, and true counts as 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _meta_problem(url: str, config: NetworkConfig, meta: dict[str, Any]) -> str | None:
    """What is wrong with the entries of config.json besides 'model' that loaders read (None when nothing is)."""
    if meta.get("stage", "finetune") not in STAGES:
        return f"'stage' is {meta['stage']!r}, not one of {', '.join(STAGES)}"
    if meta.get("kind", "tabular") != "tabular":
        return f"'kind' is {meta['kind']!r}; the only kind is 'tabular' (a tree model)"
    calibration = meta.get("calibration") or {}
    if not isinstance(calibration, dict) or not is_number(calibration.get("offset", 0.0)):
        return f"'calibration' must be an object whose 'offset' is a number, got {calibration!r}"
    if "normalisation" in meta and meta.get("kind") != "tabular":
        return _normalisation_problem(normalisation(url, meta), config)
    return None


def _normalisation_problem(norm: Normalisation, config: NetworkConfig) -> str | None:
    """The scaling must have a mean and a standard deviation per band and per climate variable of the network."""
    for what, names, mean in (("band", config.bands, norm.band_mean), ("climate", config.variables,
                                                                       norm.climate_mean)):
        if len(mean) != len(names):
            return f"'normalisation' has {len(mean)} {what} means for the {len(names)} in 'model'"
    return None


def normalisation(url: str, meta: dict[str, Any]) -> Normalisation:
    """The input and target scaling recorded in a checkpoint's config.json."""
    try:
        return Normalisation.from_dict(meta["normalisation"])
    except (KeyError, ValueError) as err:
        raise DamagedError(f"{join(url, CONFIG_FILE)}: 'normalisation' is missing or malformed ({err}); "
                           f"{FRESH_HINT}") from err


def _check_fits(url: str, config: NetworkConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a config whose network the weights are not of, naming the first entry that disagrees with them."""
    ours, theirs = _config_sizes(config), _weight_sizes(shapes)
    for name, value in ours.items():
        if theirs[name] != value:
            raise DamagedError(f"{join(url, CONFIG_FILE)}: {_disagreement(name, config, theirs[name])}: the weights "
                               f"do not fit the network in {CONFIG_FILE}; {FRESH_HINT}")


def _config_sizes(config: NetworkConfig) -> dict[str, int]:
    """The sizes of a config's network that its weights' shapes show (0 for a branch it does not have):
    'bands' as the ViT's input channels (the no-data mask is one more), 'patch_size' as its token count."""
    image, climate = bool(config.bands), bool(config.variables)
    return {"bands": len(config.bands) + config.nodata_mask * image, "image_patch": config.image_patch * image,
            "image_dim": config.image_dim * image,
            "patch_size": (config.patch_size // config.image_patch) ** 2 if image else 0,
            "image_depth": config.image_depth * image, "variables": len(config.variables),
            "climate_dim": config.climate_dim * climate, "climate_layers": config.climate_layers * climate,
            "climate_feedforward": config.climate_feedforward * climate, "embedding": config.embedding,
            "head_hidden": config.head_hidden, "quantiles": len(config.quantiles),
            "centre_pixel": head_inputs(config) - (image + climate) * config.embedding}


def _weight_sizes(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The same sizes as `_config_sizes`, read off the shapes of a SoilNet's weights."""

    def size(name: str, axis: int) -> int:
        shape = shapes.get(name, ())
        return shape[axis] if len(shape) > axis else 0

    def count(prefix: str) -> int:
        return len({name[len(prefix):].split(".")[0] for name in shapes if name.startswith(prefix)})

    patches = "image.vit.patch_embed.proj.weight"  # (dim, bands, patch, patch)
    embedding = size("image.project.weight", 0) or size("climate.project.weight", 0)
    branches = int("image.project.weight" in shapes) + int("climate.project.weight" in shapes)
    return {"bands": size(patches, 1), "image_patch": size(patches, 2), "image_dim": size(patches, 0),
            "patch_size": size("image.vit.pos_embed", 1), "image_depth": count("image.vit.blocks."),
            "variables": size("climate.embed.weight", 1), "climate_dim": size("climate.embed.weight", 0),
            "climate_layers": count("climate.encoder.layers."),
            "climate_feedforward": size("climate.encoder.layers.0.linear1.weight", 0),
            "embedding": embedding, "head_hidden": size("head.0.weight", 0), "quantiles": size("head.2.weight", 0),
            "centre_pixel": size("head.0.weight", 1) - embedding * branches}


def _disagreement(name: str, config: NetworkConfig, theirs: int) -> str:
    """An entry of 'model' and what the weights hold instead, in words."""
    if name == "patch_size":
        side, ours = math.isqrt(theirs), config.patch_size // config.image_patch
        return (f"'patch_size' is {config.patch_size} ({ours} x {ours} tokens of {config.image_patch} px), but "
                f"{MODEL_FILE} holds a network for {side} x {side} tokens (patches of {side * config.image_patch} px)")
    if name == "bands":
        mask = " and a no-data mask ('nodata_mask')" if config.nodata_mask else ""
        return (f"'bands' has {len(config.bands)} entries{mask}, but {MODEL_FILE} holds a network of {theirs} input "
                "channels")
    if name == "centre_pixel":
        return (f"'centre_pixel' is {str(config.centre_pixel).lower()}, but {MODEL_FILE} holds a head reading "
                f"{theirs} centre-pixel statistics")
    value = getattr(config, name)
    if isinstance(value, list):
        return f"'{name}' has {len(value)} entries, but {MODEL_FILE} holds a network for {theirs}"
    return f"'{name}' is {value}, but {MODEL_FILE} holds a network with {theirs}"


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
    """The model (eval mode) and the rest of config.json (normalisation, target transform, metrics); the config
    is checked against the weights before the network is built."""
    document = _document(url)
    config, meta = _config_of(url, document)
    normalisation(url, meta)
    weights = _checked_weights(url, config, document)
    model = _build_model(url, config)
    fit_weights(url, model, weights)
    return model.to(device).eval(), meta


def snapshot(url: str) -> dict[str, Any]:
    """config.json as it is now: what `load_weights`, `state_info` and `load_state` read every file from when
    given it, so that a resume takes weights, optimizer state and epoch from one save, never from two."""
    return _document(url)


def load_weights(url: str, document: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint, checked against its own config.json (to be loaded into another network)."""
    document = _document(url) if document is None else document
    return _checked_weights(url, _config_of(url, document)[0], document)


def _checked_weights(url: str, config: NetworkConfig, document: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights = _tensors(url, MODEL_FILE, read_file(url, MODEL_FILE, document))
    _check_fits(url, config, {name: tuple(tensor.shape) for name, tensor in weights.items()})
    return weights


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


def _state(url: str, document: dict[str, Any] | None = None) -> dict[str, Any]:
    state = _json(join(url, STATE_FILE), read_file(url, STATE_FILE, document))
    needed = {"param_groups": list, "state": dict, "epoch": int, "history": list}
    if not isinstance(state, dict) or not all(isinstance(state.get(k), kind) for k, kind in needed.items()):
        raise DamagedError(f"{join(url, STATE_FILE)}: expected an object with {sorted(needed)}; {FRESH_HINT}")
    return state


def state_info(url: str, document: dict[str, Any] | None = None) -> dict[str, Any]:
    """The saved `info` of a resumable state (epoch, history, run), without touching an optimizer."""
    return {k: v for k, v in _state(url, document).items() if k not in ("param_groups", "state")}


def load_state(url: str, optimizer: torch.optim.Optimizer, document: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore the optimizer; return the saved `info`."""
    info = _state(url, document)
    tensors = _tensors(url, STATE_TENSORS, read_file(url, STATE_TENSORS, document))
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
