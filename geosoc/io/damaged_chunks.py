"""A damaged chunk is one error that names it, wherever it is read (cube, SampleSet, map; any process).

Zarr decodes a batch of chunks at once, and a chunk that does not decode (a truncated or altered object: zstd's
"decompression error", a wrong size) surfaces as a bare RuntimeError or ValueError with no object named. The
codec pipeline below is Zarr's own, with one addition: when a batch fails, it decodes the batch's chunks one
by one to find the damaged object and raises DamagedError naming it. It is installed through Zarr's
configuration when `geosoc.io.storage` is imported, which every process that opens a store does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import zarr
from zarr.core.codec_pipeline import BatchedCodecPipeline
from zarr.registry import register_pipeline

from geosoc.errors import DamagedError, first_line

PIPELINE = f"{__name__}.NamingCodecPipeline"


class NamingCodecPipeline(BatchedCodecPipeline):
    """Zarr's batched pipeline; a chunk that fails to decode is reported by its object's name."""

    async def read_batch(self, batch_info: Iterable[Any], out: Any, drop_axes: tuple[int, ...] = ()) -> None:
        batch = list(batch_info)
        try:
            await super().read_batch(batch, out, drop_axes)
        except (RuntimeError, ValueError) as err:
            if not self.supports_partial_decode:
                await self._raise_for_damaged_chunk(batch, err)
            raise

    async def _raise_for_damaged_chunk(self, batch: list[Any], err: Exception) -> None:
        for byte_getter, spec, *_ in batch:
            data = await byte_getter.get(spec.prototype)
            try:
                await self.decode_batch([(data, spec)])
            except (RuntimeError, ValueError) as one:
                raise DamagedError(
                    f"{object_name(byte_getter)}: this stored chunk is damaged ({first_line(one)}); remove the "
                    "store and write it again (or re-run the step that wrote it)"
                ) from err


def object_name(byte_getter: Any) -> str:
    """The URL of a chunk as users name it: s3://bucket/…/c/0/1, or a local path."""
    store, key = byte_getter.store, byte_getter.path
    fs = getattr(store, "fs", None)
    if fs is not None:
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        return f"{protocol}://{store.path.rstrip('/')}/{key}"
    root = getattr(store, "root", None)
    return f"{root}/{key}" if root is not None else f"{store}/{key}"


def install() -> None:
    """Make Zarr read through NamingCodecPipeline in this process (idempotent)."""
    if zarr.config.get("codec_pipeline.path") != PIPELINE:
        register_pipeline(NamingCodecPipeline)
        zarr.config.set({"codec_pipeline.path": PIPELINE})
