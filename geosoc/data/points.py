"""Soil point tables (LUCAS 2015/2018, RaCA, Edgeroi, any CSV/GeoParquet) -> validated points on a grid CRS.

Every problem is reported with the file's line number (CSV: header is line 1) or row number (Parquet) and
the reason; `on_error="drop"` keeps the good rows, `"fail"` stops with the whole report. Input files are
only ever read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError

from geosoc.errors import InputError, NotFoundError, first_line

OnError = Literal["drop", "fail"]
FORMATS = ("lucas2015", "lucas2018", "raca", "edgeroi", "csv")


@dataclass(frozen=True)
class Columns:
    """Which columns hold the id, the coordinates (x/lon, y/lat, in `crs`) and the target, in which units."""

    id: str | None  # None: each point is named by its row ("row 2" is a CSV's first data line)
    x: tuple[str, ...]  # first one present is used (LUCAS 2015 files differ)
    y: tuple[str, ...]
    target: str | None
    crs: str = "EPSG:4326"
    units: str = "g/kg"


PRESETS: dict[str, Columns] = {
    "lucas2015": Columns("Point_ID", ("GPS_LONG", "long"), ("GPS_LAT", "lat"), "OC", units="g/kg"),
    "lucas2018": Columns("POINTID", ("TH_LONG",), ("TH_LAT",), "OC", units="g/kg"),
    "raca": Columns("rcasiteid", ("Gen_long",), ("Gen_lat",), "SOCstock100", units="Mg/ha"),
    "edgeroi": Columns("SOURCEID", ("x_mga55",), ("y_mga55",), "ORCDRC", crs="EPSG:28355", units="g/kg"),
}


@dataclass(frozen=True)
class Problem:
    row: int  # line in a CSV (header = 1), row in a Parquet file (first = 1)
    column: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.column}: {self.reason}"


@dataclass
class Points:
    """Valid points: ids, coordinates in the grid CRS and as lon/lat, target (NaN where none)."""

    ids: np.ndarray  # object (str)
    x: np.ndarray
    y: np.ndarray
    lon: np.ndarray
    lat: np.ndarray
    target: np.ndarray
    units: str
    source: str
    problems: list[Problem] = field(default_factory=list)
    index: np.ndarray | None = None  # position of each point in the input table (0-based)
    target_name: str = "SOC"  # the table's column, e.g. ORCDRC: what evaluation tables and plots call it

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = np.arange(len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, keep: np.ndarray) -> Points:
        return replace(self, ids=self.ids[keep], x=self.x[keep], y=self.y[keep], lon=self.lon[keep],
                       lat=self.lat[keep], target=self.target[keep],
                       index=self.index[keep] if self.index is not None else None)


def lonlat(x: np.ndarray, y: np.ndarray, crs: str) -> tuple[np.ndarray, np.ndarray]:
    """Longitude and latitude (EPSG:4326) of points given in `crs`."""
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
    return np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)


def report(problems: Sequence[Problem | str], limit: int = 50) -> str:
    lines = [str(p) for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    return "\n".join(lines)


def read_points(
    path: str | Path,
    grid_crs: str,
    fmt: str = "csv",
    columns: Columns | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    on_error: OnError = "fail",
    table: Table | None = None,
) -> Points:
    """Read and validate a point table; coordinates are returned in `grid_crs` (and as lon/lat).

    `table` is the file already read with `read_table` (to read it once when other columns are needed)."""
    path = Path(path)
    if on_error not in ("drop", "fail"):
        raise InputError(f"on_error (--on-error) must be 'drop' or 'fail', got {on_error!r}")
    spec = point_columns(path, fmt, columns)
    frame, first_row, crs = table if table is not None else read_table(path, spec)
    problems: list[Problem] = []

    def need(names: tuple[str, ...] | str | None, role: str) -> str | None:
        options = (names,) if isinstance(names, str) else names
        if options is None:
            return None
        for name in options:
            if name in frame.columns:
                return name
        wanted = " or ".join(repr(n) for n in options)
        raise InputError(
            f"{path}: missing column {wanted} ({role}); found columns: {', '.join(map(str, frame.columns))}"
        )

    id_col, x_col, y_col = need(spec.id, "id"), need(spec.x, "x/longitude"), need(spec.y, "y/latitude")
    target_col = need(spec.target, "target")
    assert x_col is not None and y_col is not None  # a column mapping always names x and y
    rows = np.arange(len(frame)) + first_row
    bad = np.zeros(len(frame), dtype=bool)

    def numbers(column: str) -> np.ndarray:
        raw = frame[column]
        values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
        unparsed = np.isnan(values) & raw.notna().to_numpy() & (raw.astype(str).str.strip() != "").to_numpy()
        for i in np.flatnonzero(unparsed):
            problems.append(Problem(int(rows[i]), column, f"not a number: {raw.iloc[i]!r}"))
        bad[unparsed] = True
        return values

    if id_col is None:
        ids = np.array([f"row{row}" for row in rows], dtype=object)
        no_id = np.zeros(len(frame), dtype=bool)
    else:
        ids = frame[id_col].astype(str).str.strip().to_numpy(dtype=object)
        no_id = frame[id_col].isna().to_numpy() | (ids == "")
        for i in np.flatnonzero(no_id):
            problems.append(Problem(int(rows[i]), id_col, "missing id"))
    bad |= no_id
    x, y = numbers(x_col), numbers(y_col)
    for i in np.flatnonzero(np.isnan(x) | np.isnan(y)):
        if not bad[i]:
            problems.append(Problem(int(rows[i]), f"{x_col}/{y_col}", "missing coordinate"))
    bad |= np.isnan(x) | np.isnan(y)
    geographic = known_crs(crs, f"{path}: the coordinates' CRS (--points-crs)").is_geographic
    known_crs(grid_crs, "the SampleSet's CRS (--crs, or the region's)")
    if geographic:
        out = ~bad & ((np.abs(y) > 90) | (np.abs(x) > 180))
        for i in np.flatnonzero(out):
            problems.append(Problem(int(rows[i]), f"{x_col}/{y_col}", f"lon {x[i]}, lat {y[i]} out of range"))
        bad |= out
    duplicated = pd.Series(ids).duplicated().to_numpy() & ~no_id
    for i in np.flatnonzero(duplicated):
        problems.append(Problem(int(rows[i]), str(id_col), f"duplicate id {ids[i]!r}"))
    bad |= duplicated
    if target_col is not None:
        target = numbers(target_col)
        missing = np.isnan(target) & ~bad
        for i in np.flatnonzero(missing):
            problems.append(Problem(int(rows[i]), target_col, "missing value"))
        negative = target < 0
        for i in np.flatnonzero(negative):
            problems.append(Problem(int(rows[i]), target_col, f"negative SOC {target[i]}"))
        too_large = ~np.isnan(target) & ~negative & ~(target <= np.finfo(np.float32).max)
        for i in np.flatnonzero(too_large):
            problems.append(Problem(int(rows[i]), target_col, f"SOC {target[i]} is not a finite number a SampleSet "
                                                              "can hold (float32)"))
        bad |= missing | negative | too_large
    else:
        target = np.full(len(frame), np.nan)

    gx, gy = Transformer.from_crs(crs, grid_crs, always_xy=True).transform(x, y)
    gx, gy = np.asarray(gx, dtype=np.float64), np.asarray(gy, dtype=np.float64)
    lon, lat = lonlat(x, y, crs)
    if bounds is not None:
        xmin, ymin, xmax, ymax = bounds
        outside = ~bad & ~((gx >= xmin) & (gx < xmax) & (gy > ymin) & (gy <= ymax))
        for i in np.flatnonzero(outside):
            problems.append(Problem(int(rows[i]), f"{x_col}/{y_col}", "outside the region"))
        bad |= outside
    problems.sort(key=lambda p: p.row)
    if problems and on_error == "fail":
        raise InputError(
            f"{path}: {len(problems)} problem(s) in {int(bad.sum())} of {len(frame)} rows "
            f"(use --on-error drop to skip them):\n{report(problems)}"
        )
    keep = ~bad
    if not keep.any():
        raise InputError(f"{path}: no valid points among {len(frame)} rows:\n{report(problems)}")
    points = Points(ids, gx, gy, lon, lat, target, spec.units, str(path), problems,
                    target_name=target_col or "SOC")
    return points.subset(keep)


def known_crs(value: str, what: str) -> CRS:
    """`value` as a pyproj CRS, or an error naming `what` it was meant to be."""
    try:
        return CRS.from_user_input(value)
    except CRSError as err:
        raise InputError(f"{what}: {value!r} is not a CRS pyproj knows ({first_line(err)})") from err


Table = tuple[pd.DataFrame, int, str]  # rows as text, number of the first data row, CRS of the coordinates


def point_columns(path: Path, fmt: str, columns: Columns | None) -> Columns:
    """The column mapping: the one given, or the format's preset."""
    if fmt not in FORMATS:
        raise InputError(f"{path}: unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    spec = columns or PRESETS.get(fmt)
    if spec is None:
        raise InputError(f"{path}: format 'csv' needs a column mapping (id, x, y, target and CRS)")
    return spec


def read_table(path: Path, spec: Columns) -> Table:
    """The table as text-preserving columns, the number of its first data row, and the coordinates' CRS."""
    try:
        if path.suffix.lower() in (".parquet", ".geoparquet"):
            return _read_geoparquet(path, spec)
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""]), 2, spec.crs
    except FileNotFoundError as err:
        raise NotFoundError(f"{path}: no such file") from err
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: cannot read table: {first_line(err)}") from err


def _read_geoparquet(path: Path, spec: Columns) -> Table:
    """Parquet; with GeoParquet metadata the point geometry gives x/y and its CRS."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    frame = table.to_pandas()
    metadata = table.schema.metadata or {}
    crs = spec.crs
    if b"geo" in metadata:
        import shapely

        geo = json.loads(metadata[b"geo"])
        column = geo["primary_column"]
        info = geo["columns"][column]
        geometry = shapely.from_wkb(frame[column].to_numpy())
        frame = frame.drop(columns=[column])
        frame[spec.x[0]], frame[spec.y[0]] = shapely.get_x(geometry), shapely.get_y(geometry)
        found = info.get("crs", "OGC:CRS84")  # GeoParquet's default when absent
        crs = CRS.from_user_input(found if not isinstance(found, dict) else json.dumps(found)).to_string()
    return frame.astype(object).where(frame.notna(), None), 1, crs
