"""A kustomize renderer for exactly what infra/kuberay uses (no kustomize binary is on PyPI: the `kustomize`
package there is something else), so that the tests check what `kubectl apply -k` would apply."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

# --- a kustomize renderer for exactly what infra/kuberay uses -------------------------------------------------
# No kustomize binary is on PyPI (the `kustomize` package there is something else), so `kubectl apply -k` is
# reproduced here for the features the overlays use: resources (files and directories), patches (strategic merge
# of maps and scalars, JSON 6902 add/remove/replace/test) and images (newName/newTag). Anything else is refused
# rather than rendered differently from kustomize: another kustomization field, a list or a `$patch` directive in
# a strategic-merge patch (kustomize merges lists by schema or by `name`, which this does not attempt), a patch
# or an image entry that matches nothing.

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}


class Unsupported(NotImplementedError):
    """A kustomization uses something this renderer does not implement."""


def render(directory: Path) -> list[dict[str, Any]]:
    """What `kustomize build directory` prints, as objects."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if spec.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or spec.get("kind") != "Kustomization":
        raise Unsupported(f"{directory}: not a kustomize.config.k8s.io/v1beta1 Kustomization")
    if set(spec) - KUSTOMIZATION_FIELDS:
        raise Unsupported(f"{directory}: fields {sorted(set(spec) - KUSTOMIZATION_FIELDS)} are not implemented")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects += render(path)
        elif path.is_file():
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        else:
            raise FileNotFoundError(path)
    ids = [(o["kind"], o["metadata"]["name"]) for o in objects]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{directory}: a resource appears twice: {ids}")
    for patch in spec.get("patches", []):
        apply_patch(objects, patch, directory)
    for image in spec.get("images", []):
        set_image(objects, image)
    return objects


def apply_patch(objects: list[dict[str, Any]], entry: dict[str, Any], directory: Path) -> None:
    if set(entry) - {"path", "patch", "target"} or ("path" in entry) == ("patch" in entry):
        raise Unsupported(f"patch entry {entry}: one of path or patch, and an optional target, is implemented")
    text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
    docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    if len(docs) != 1:
        raise Unsupported(f"patch {entry.get('path', '(inline)')}: one document per patch")
    patch, target = docs[0], entry.get("target")
    if target is not None and set(target) - {"kind", "name"}:
        raise Unsupported(f"patch target {target}: only kind and name are implemented")
    if isinstance(patch, list) and target is None:
        raise ValueError("a JSON 6902 patch needs a target")
    target = target or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
    matches = [o for o in objects if o["kind"] == target.get("kind", o["kind"])
               and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])]
    if isinstance(patch, list):
        for obj in matches:
            json_patch(obj, patch)
    else:
        refuse_lists_and_directives(patch)
        for obj in matches:
            merge_patch(obj, patch)
    if not matches:
        raise ValueError(f"patch {entry.get('path', '(inline)')} matches no resource")


def refuse_lists_and_directives(patch: Any, path: str = "") -> None:
    if isinstance(patch, list):
        raise Unsupported(f"strategic-merge patch: a list at {path or '/'}; use a JSON 6902 patch")
    if isinstance(patch, dict):
        for key, value in patch.items():
            if str(key).startswith("$"):
                raise Unsupported(f"strategic-merge patch: directive {key} at {path or '/'}")
            refuse_lists_and_directives(value, f"{path}/{key}")


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def json_patch(target: dict[str, Any], operations: list[dict[str, Any]]) -> None:
    """RFC 6902 add, remove, replace and test."""
    for op in operations:
        kind = op.get("op")
        if kind not in ("add", "remove", "replace", "test") or set(op) - {"op", "path", "value"}:
            raise Unsupported(f"JSON 6902 operation {op}")
        if not op["path"].startswith("/"):
            raise ValueError(f"JSON pointer {op['path']!r}")
        *parents, last = [t.replace("~1", "/").replace("~0", "~") for t in op["path"][1:].split("/")]
        node: Any = target
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node[token]
        if isinstance(node, list):
            if kind == "add" and last == "-":
                node.append(copy.deepcopy(op["value"]))
                continue
            index = int(last)
            if not 0 <= index < len(node) + (kind == "add"):
                raise IndexError(f"{op['path']}: no element {index}")
            if kind == "add":
                node.insert(index, copy.deepcopy(op["value"]))
                continue
            exists = True
        else:
            exists = last in node
        if kind != "add" and not exists:
            raise KeyError(f"{op['path']} does not exist ({kind})")
        key: Any = int(last) if isinstance(node, list) else last
        if kind == "test":
            if node[key] != op["value"]:
                raise AssertionError(f"JSON 6902 test failed: {op['path']} is {node[key]!r}, not {op['value']!r}")
        elif kind == "remove":
            del node[key]
        else:
            node[key] = copy.deepcopy(op["value"])


def containers(value: Any) -> Iterator[dict[str, Any]]:
    """Every container and init container at any depth (where kustomize's images transformer looks too)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("containers", "initContainers") and isinstance(item, list):
                yield from (c for c in item if isinstance(c, dict))
            else:
                yield from containers(item)
    elif isinstance(value, list):
        for item in value:
            yield from containers(item)


def set_image(objects: list[dict[str, Any]], entry: dict[str, Any]) -> None:
    if set(entry) - {"name", "newName", "newTag"}:
        raise Unsupported(f"images entry {entry}: name, newName and newTag are implemented")
    matched = False
    for container in containers(objects):
        reference = container.get("image", "")
        if "@" in reference:
            raise Unsupported(f"image digest in {reference}")
        name, tag = reference, None
        if reference.rfind(":") > reference.rfind("/"):
            name, tag = reference.rsplit(":", 1)
        if name == entry["name"]:
            matched = True
            tag = entry.get("newTag", tag)
            container["image"] = entry.get("newName", name) + (f":{tag}" if tag else "")
    if not matched:
        raise ValueError(f"images entry {entry['name']} matches no container")
