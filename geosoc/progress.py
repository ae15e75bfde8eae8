"""Resumable chunked writes: per-chunk completion markers beside a Zarr store, and the task runner.

Used by every artefact written chunk by chunk (the cube, the maps). A chunk is written by exactly one task
into its own Zarr chunk, then a marker object is put beside the store (`<store>.progress/<build id>/<key>`);
a re-run skips chunks with a marker and so never rewrites finished work, whatever moment the previous run
was killed at. Markers live outside the Zarr hierarchy (zarr warns about foreign objects inside it).
"""

from __future__ import annotations

import os
from typing import Any

import dask
from tqdm.auto import tqdm

from geosoc.storage import filesystem, join


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
        self.url = join(progress_url(store), build_id)

    def mark(self, key: str) -> None:
        fs, path = filesystem(self.url)
        fs.pipe_file(f"{path}/{key}", b"")

    def completed(self) -> set[str]:
        fs, path = filesystem(self.url)
        if not fs.exists(path):
            return set()
        return {found[len(path) + 1 :] for found in fs.find(path)}


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
    from dask.callbacks import Callback

    class _Tick(Callback):
        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
            bar.update(1)

    with _Tick():
        dask.compute(*tasks, scheduler="threads", num_workers=workers or os.cpu_count())
