"""Point readers: each format as published (made here, with realistic headers and messy values), every
validation problem with its row and reason, and input files left untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from geosoc.data.points import Columns, read_points
from geosoc.errors import GeosocError
from tests.helpers import EDGEROI

EUROPE = (2_500_000, 1_400_000, 7_400_000, 5_500_000)

LUCAS_2015 = """Point_ID,Coarse,Clay,Sand,Silt,pH(CaCl2),pH(H2O),EC,OC,CaCO3,P,N,K,Country,GPS_LAT,GPS_LONG
47862690,4,12,62,26,4.1,4.7,8.73,20.9,1,<LOD,1.5,56.4,AT,47.15,9.57
47882704,9,25,40,35,6.9,7.3,16.2,56.7,45,11.9,3.4,164.2,AT,47.22,9.84
47982688,1,,,,7.2,7.6,22.1,12.5,3,22.6,1.9,139.5,AT,47.09,10.21
"""

LUCAS_2015_LOWER = """Point_ID,OC,lat,long
1,10.5,48.1,11.5
2,33.0,48.2,11.6
"""

LUCAS_2018 = """Depth,POINTID,pH_CaCl2,pH_H2O,EC,OC,CaCO3,P,N,K,OC (20-30 cm),CaCO3 (20-30 cm),NUTS_0,NUTS_1,NUTS_2,NUTS_3,TH_LAT,TH_LONG,SURVEY_DATE,Elev,LC,LU,LC0_Desc,LC1_Desc,LU1_Desc
0-20 cm,47862690,4.4,5.1,9.6,29.4,< LOD,< LOD,2.1,77.6,,,AT,AT3,AT33,AT334,47.15,9.57,06-07-18,1528,E20,U111,Grassland,Grassland without tree/shrub cover,Agriculture (excluding fallow land and kitchen gardens)
0-20 cm,47882704,6.2,6.9,19.4,< LOD,15,12.6,2.8,151.1,,,AT,AT3,AT33,AT334,47.22,9.84,05-07-18,1015,E20,U111,Grassland,Grassland without tree/shrub cover,Agriculture
0-20 cm,47982688,7.1,7.5,15.2,<0.0,<1,31.5,1.5,90.2,,,AT,AT3,AT33,AT334,47.09,10.21,19-07-18,595,B11,U111,Cropland,Common wheat,Agriculture
0-20 cm,48002700,6.8,7.2,12.1,18.7,2,25.2,1.7,120.8,,,AT,AT3,AT33,AT334,47.21,10.32,19-07-18,640,B11,U111,Cropland,Common wheat,Agriculture
"""

RACA = """rcasiteid,Gen_lat,Gen_long,SOCstock5,SOCstock30,SOCstock100,Upedonid
C0101C01,43.1,-89.2,12.3,58.1,143.2,C0101C01P1
C0101C02,43.2,-89.3,10.1,44.7,98.4,C0101C02P1
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_lucas_2015_as_published(tmp_path: Path) -> None:
    path = write(tmp_path, "LUCAS_Topsoil_2015_20200323.csv", LUCAS_2015)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    points = read_points(path, "EPSG:3035", "lucas2015", bounds=EUROPE)
    assert list(points.ids) == ["47862690", "47882704", "47982688"]
    np.testing.assert_allclose(points.target, [20.9, 56.7, 12.5])
    np.testing.assert_allclose(points.lat, [47.15, 47.22, 47.09])
    assert points.units == "g/kg" and (points.x > 4e6).all()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # never modified


def test_lucas_2015_lowercase_coordinates(tmp_path: Path) -> None:
    points = read_points(write(tmp_path, "l.csv", LUCAS_2015_LOWER), "EPSG:3035", "lucas2015")
    np.testing.assert_allclose(points.lon, [11.5, 11.6])


def test_lucas_2018_text_in_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, "LUCAS-SOIL-2018.csv", LUCAS_2018)
    with pytest.raises(GeosocError) as info:
        read_points(path, "EPSG:3035", "lucas2018")
    message = str(info.value)
    assert "2 problem(s) in 2 of 4 rows" in message and "--on-error drop" in message
    assert "row 3: OC: not a number: '< LOD'" in message
    assert "row 4: OC: not a number: '<0.0'" in message
    points = read_points(path, "EPSG:3035", "lucas2018", on_error="drop")
    assert list(points.ids) == ["47862690", "48002700"] and len(points.problems) == 2


def test_raca(tmp_path: Path) -> None:
    points = read_points(write(tmp_path, "RaCA_SOC_pedons.csv", RACA), "EPSG:5070", "raca")
    assert points.units == "Mg/ha" and list(points.target) == [143.2, 98.4]


def test_edgeroi_real_points() -> None:
    path = EDGEROI / "edgeroi_topsoil_first_horizon.csv"
    with pytest.raises(GeosocError, match=r"row 2: ORCDRC: missing value"):
        read_points(path, "EPSG:28355", "edgeroi")
    points = read_points(path, "EPSG:28355", "edgeroi", on_error="drop")
    assert len(points) == 323 and abs(np.median(points.target) - 14.0) < 1.0


def test_every_validation_problem(tmp_path: Path) -> None:
    text = """site,lon,lat,soc
a,11.5,48.1,12
b,,48.2,10
c,11.6,95.0,10
a,11.7,48.3,10
d,11.8,48.4,-3
e,abc,48.5,10
f,179.0,0.0,10
,11.9,48.6,10
"""
    path = write(tmp_path, "messy.csv", text)
    columns = Columns("site", ("lon",), ("lat",), "soc")
    with pytest.raises(GeosocError) as info:
        read_points(path, "EPSG:3035", "csv", columns, bounds=EUROPE)
    message = str(info.value)
    for expected in (
        "row 3: lon/lat: missing coordinate",
        "row 4: lon/lat: lon 11.6, lat 95.0 out of range",
        "row 5: site: duplicate id 'a'",
        "row 6: soc: negative SOC -3.0",
        "row 7: lon: not a number: 'abc'",
        "row 8: lon/lat: outside the region",
        "row 9: site: missing id",
    ):
        assert expected in message, message
    points = read_points(path, "EPSG:3035", "csv", columns, bounds=EUROPE, on_error="drop")
    assert list(points.ids) == ["a"]


def test_missing_column_names_what_was_found(tmp_path: Path) -> None:
    path = write(tmp_path, "x.csv", "id,lat,lon\n1,2,3\n")
    with pytest.raises(GeosocError, match=r"x\.csv: missing column 'OC' \(target\); found columns: id, lat, lon"):
        read_points(path, "EPSG:3035", "lucas2018", Columns("id", ("lon",), ("lat",), "OC"))


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GeosocError, match="unknown format 'lucas2009'"):
        read_points(tmp_path / "a.csv", "EPSG:3035", "lucas2009")
    with pytest.raises(GeosocError, match="no such file"):
        read_points(tmp_path / "a.csv", "EPSG:3035", "lucas2018")


def test_geoparquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    shapely = pytest.importorskip("shapely")
    import json

    geometry = shapely.to_wkb(shapely.points([750000.0, 760000.0], [6660000.0, 6665000.0]))
    table = pa.table({"id": ["p1", "p2"], "soc": [12.0, 30.5], "geometry": geometry})
    geo = {"version": "1.1.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "crs": "EPSG:28355", "geometry_types": ["Point"]}}}
    table = table.replace_schema_metadata({b"geo": json.dumps(geo).encode()})
    path = tmp_path / "points.parquet"
    pq.write_table(table, path)
    points = read_points(path, "EPSG:28355", "csv", Columns("id", ("x",), ("y",), "soc"))
    np.testing.assert_allclose(points.x, [750000.0, 760000.0])
    np.testing.assert_allclose(points.target, [12.0, 30.5])
    assert (points.lat < -29).all()
