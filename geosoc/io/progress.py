"""Resumable chunked writes: the life of a store written chunk by chunk (the cube, the maps).

A build writes a metadata-only template whose root attributes name the build (id, fingerprint of what it
is made from, status) and end with `geosoc_template_complete`, written last. Then every chunk is written by
exactly one task into its own Zarr chunk, and a marker object is put beside the store
(`<store>.progress/<build id>/<key>`); a re-run skips chunks with a marker and so never rewrites finished
work, whatever moment the previous run was killed at. Markers live outside the Zarr hierarchy (zarr warns
about foreign objects inside it) and are removed when the store is complete.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from pathlib import Path
from typing import Any

import zarr
from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm

from geosoc.errors import IncompatibleError
from geosoc.io.storage import consolidate, filesystem, join, read_group_attrs, zarr_store
from geosoc.threads import available_cores
from geosoc.version import __version__

PARTIAL = re.compile(r".+\.[0-9a-f]{32}\.partial")  # a chunk write of Zarr's LocalStore, not finished


def progress_url(store: str) -> str:
    return store.rstrip("/") + ".progress"


def remove(url: str) -> None:
    """Remove a file or folder (prefix) if it exists."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


class Markers:
    """Per-chunk completion markers of one build of one store: one small object per finished chunk."""

    def __init__(self, store: str, build_id: str) -> None:
        self.build_id = build_id
        self.url = join(progress_url(store), build_id)

    def mark(self, key: str) -> None:
        fs, path = filesystem(self.url)
        fs.pipe_file(f"{path}/{key}", b"")

    def completed(self) -> set[str]:
        fs, path = filesystem(self.url)
        if not fs.exists(path):
            return set()
        return {found[len(path) + 1 :] for found in fs.find(path)}


def resumable(url: str, fingerprint: str, refusal: str, fresh: bool = False) -> dict[str, Any] | None:
    """The root attributes of an earlier build of the same thing to resume, or None: write a new template.

    A store made from something else (another fingerprint) is refused with `f"{url} {refusal}"`."""
    attrs = None if fresh else read_group_attrs(url)
    if attrs is not None and attrs.get("geosoc_fingerprint") not in (None, fingerprint):
        raise IncompatibleError(f"{url} {refusal}")
    if attrs is None or not attrs.get("geosoc_template_complete"):
        return None
    if attrs.get("geosoc_status") == "complete":
        remove(progress_url(url))  # a run killed just after the status turned complete left its markers
    else:
        remove_partial_writes(url)
    return attrs


def remove_partial_writes(url: str) -> None:
    """Delete the temporary files of chunk writes a killed run left inside a local store (Zarr's LocalStore
    writes `<chunk>.<hex>.partial`, then renames it); object stores write a chunk in one request and have none."""
    fs, path = filesystem(url)
    if not isinstance(fs, LocalFileSystem) or not fs.exists(path):
        return
    for leftover in Path(path).rglob("*.partial"):
        if PARTIAL.fullmatch(leftover.name):
            leftover.unlink(missing_ok=True)


def new_build(url: str, fingerprint: str, status: str, **attrs: Any) -> dict[str, Any]:
    """Root attributes of a new build (its template not yet complete); markers of an abandoned one removed."""
    remove(progress_url(url))
    return {
        **attrs,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "geosoc_version": __version__,
        "geosoc_fingerprint": fingerprint,
        "geosoc_build_id": uuid.uuid4().hex,
        "geosoc_status": status,
        "geosoc_template_complete": False,
    }


def template_written(url: str, attrs: dict[str, Any]) -> dict[str, Any]:
    """Flag the template complete, last: a store without the flag gets a new template on the next run."""
    group = zarr.open_group(zarr_store(url), mode="r+", zarr_format=3)
    group.attrs.update({"geosoc_template_complete": True})
    return {**attrs, "geosoc_template_complete": True}


def complete(url: str, attrs: dict[str, Any]) -> None:
    """Mark the store complete (with `attrs`, e.g. the chunk record) and remove its markers."""
    group = zarr.open_group(zarr_store(url), mode="r+", zarr_format=3)
    group.attrs.update({"geosoc_status": "complete", **attrs})
    consolidate(url)
    remove(progress_url(url))


def run_tasks(tasks: list[Any], client: Any, workers: int | None, bar: tqdm) -> None:
    """Compute dask delayed tasks on threads (or a dask.distributed `client`), ticking `bar` per task."""
    if not tasks:
        return
    if client is not None:
        from distributed import as_completed

        for future in as_completed(client.compute(tasks)):
            future.result()
            bar.update(1)
        return
    import dask  # here, not above: map actors use the markers alone, and start faster without dask
    from dask.callbacks import Callback

    class _Tick(Callback):
        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
            bar.update(1)

    with _Tick():
        dask.compute(*tasks, scheduler="threads", num_workers=workers or available_cores())
