"""SampleSets from data prepared elsewhere: a point table whose climate series are columns, and/or patches
in a NumPy file aligned with the table's rows. Every later step then runs on it like on a sampled cube.

Climate columns are named `<variable>_<YYYY-MM>` (e.g. `pr_2010-01`, `tmmx_2010-01`, ...), one per variable
and month; every variable must have every month.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np
import pandas as pd

from geosoc.data.points import Columns, Points, point_columns, read_points, read_table
from geosoc.data.sampling import SampleReport, SampleSetWriter, sampleset_dataset, spatial_folds
from geosoc.errors import InputError, NotFoundError, first_line
from geosoc.io.storage import check_writable, parent_url

CLIMATE_COLUMN = re.compile(r"^(?P<variable>[A-Za-z][A-Za-z0-9]*)_(?P<month>\d{4}-\d{2})$")


def climate_from_columns(table: pd.DataFrame, path: Path,
                         first_row: int = 2) -> tuple[np.ndarray, list[dt.date], list[str]] | None:
    """(rows, time, variable) from `<variable>_<YYYY-MM>` columns, or None when the table has none."""
    found = [(m["variable"], m["month"], name) for name in table.columns if (m := CLIMATE_COLUMN.match(str(name)))]
    if not found:
        return None
    variables = list(dict.fromkeys(v for v, _, _ in found))
    months = sorted({m for _, m, _ in found})
    present = {(v, m) for v, m, _ in found}
    missing = [f"{v}_{m}" for v in variables for m in months if (v, m) not in present]
    if missing:
        more = " ..." if len(missing) > 10 else ""
        raise InputError(f"{path}: climate columns incomplete, missing {missing[:10]}{more}")
    values = np.empty((len(table), len(months), len(variables)), dtype=np.float32)
    for j, variable in enumerate(variables):
        for t, month in enumerate(months):
            column = f"{variable}_{month}"
            numbers = pd.to_numeric(table[column], errors="coerce")
            unparsed = numbers.isna() & table[column].notna()
            if unparsed.any():
                index = int(np.flatnonzero(unparsed.to_numpy())[0])
                raise InputError(
                    f"{path}: row {index + first_row}: {column}: not a number: {table[column].iloc[index]!r}"
                )
            values[:, t, j] = numbers.to_numpy(dtype=np.float32)
    dates = [dt.date(int(m[:4]), int(m[5:]), 1) for m in months]
    return values, dates, variables


def sampleset_from_table(
    table_path: str | Path, out_url: str, grid_crs: str, fmt: str = "csv", columns: Columns | None = None,
    patches_path: str | Path | None = None, bands: list[str] | None = None, *, fold_block_size: float,
    folds: int, on_error: str = "fail", seed: int = 0,
) -> SampleReport:
    """Write a SampleSet from a table with climate columns and/or a (rows, band, py, px) .npy of patches."""
    check_writable(parent_url(out_url))  # first: a place that cannot take the SampleSet is one line, before any work
    table_path = Path(table_path)
    read = read_table(table_path, point_columns(table_path, fmt, columns))
    points: Points = read_points(table_path, grid_crs, fmt, columns, on_error=on_error, table=read)  # type: ignore[arg-type]
    table = read[0]
    climate = climate_from_columns(table, table_path, first_row=read[1])
    patches = None
    if patches_path is not None:
        patches = _load_patches(Path(patches_path))
        if patches.ndim != 4 or patches.shape[0] != len(table) or patches.shape[2] != patches.shape[3]:
            raise InputError(
                f"{patches_path}: expected an array (rows={len(table)}, band, py, px) with square patches, "
                f"got shape {patches.shape}"
            )
        bands = bands or [f"band{i}" for i in range(patches.shape[1])]
        if len(bands) != patches.shape[1]:
            raise InputError(f"{patches_path}: {patches.shape[1]} bands but --bands names {len(bands)}")
    if climate is None and patches is None:
        raise InputError(
            f"{table_path}: no climate columns (<variable>_<YYYY-MM>) and no --patches: nothing to learn from"
        )
    with SampleSetWriter(out_url, bands if patches is not None else None,
                         patches.shape[2] if patches is not None else None) as writer:
        if patches is not None:
            writer.append(np.asarray(patches[points.index], dtype=np.float32))
        series, months, variables = ((climate[0][points.index], climate[1], climate[2]) if climate
                                     else (None, None, None))
        fold = spatial_folds(points.x, points.y, fold_block_size, folds, seed)
        kind = "labelled" if np.isfinite(points.target).any() else "unlabelled"  # a table without targets
        attrs = {"cube": "", "patch_size": int(patches.shape[2]) if patches is not None else 0, "crs": grid_crs,
                 "kind": kind, "source": str(table_path), "fold_block_size": fold_block_size}
        url = writer.finish(sampleset_dataset(points, fold, series, months, variables,
                                     bands if patches is not None else None, attrs))
    return SampleReport(url, len(points), [str(problem) for problem in points.problems], climate is not None)


def _load_patches(path: Path) -> np.ndarray:
    """A .npy array of numbers, memory-mapped (never unpickled)."""
    try:
        patches = np.load(path, allow_pickle=False, mmap_mode="r")
    except FileNotFoundError as err:
        raise NotFoundError(f"{path}: no such file (--patches)") from err
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"{path}: not a NumPy .npy array (--patches): {first_line(err)}") from err
    if not isinstance(patches, np.ndarray) or patches.dtype.kind not in "fiu":
        raise InputError(f"{path}: expected an array of numbers (--patches), got {getattr(patches, 'dtype', '?')}")
    return patches
