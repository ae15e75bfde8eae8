"""A root that cannot take writes is one `error:` line from every writing command, before anything is written:
a file, a path under a file, a read-only folder (as a user without root's rights); and a build refused by the cube
it finds (another part of the region, damaged metadata) writes nothing either, not even its synthetic sources."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from typer.testing import CliRunner

from geosoc.cli import app
from tests.commands import DEMO_PART, one_error_line, run_commands, writing_commands
from tests.helpers import files_state, without_root_rights


def test_a_file_as_root_or_above_it_is_one_line_from_every_writing_command(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for root in (blocker, blocker / "root"):
        commands = writing_commands(str(root), inputs)
        before = files_state(tmp_path)
        for args in commands:
            result = CliRunner().invoke(app, args)
            line = one_error_line({"step": args[0], "exit_code": result.exit_code, "output": result.output})
            assert f"cannot write here ({blocker} is a file, not a folder)" in line, line
        assert files_state(tmp_path) == before


def test_a_read_only_root_is_one_line_from_every_writing_command() -> None:
    """The read-only folder itself and a folder to be made in it, as a user without root's rights; the inputs and
    HOME readable (and HOME writable) by that user."""
    folder = Path(tempfile.mkdtemp(prefix="geosoc-read-only-"))
    try:
        folder.chmod(0o755)
        read_only, home, inputs = folder / "read-only", folder / "home", folder / "inputs"
        for path in (read_only, home, inputs):
            path.mkdir()
        home.chmod(0o777)
        read_only.chmod(0o555)
        wrap = without_root_rights(read_only)
        steps = [(args, {}) for root in (read_only, read_only / "root")
                 for args in writing_commands(str(root), inputs)]
        for path in inputs.iterdir():
            path.chmod(0o644)
        before = files_state(folder)
        for result in run_commands(steps, {"HOME": str(home)}, keep_going=True, wrap=wrap, cwd=str(home)):
            line = one_error_line(result)
            assert line.startswith(f"error: {read_only}") and ": cannot write here (Permission denied)" in line, line
        assert files_state(folder) == before
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_refused_builds_write_nothing(tmp_path: Path) -> None:
    """A build over a cube of another part of the region, or over one whose metadata is damaged, is refused before
    it writes anything: the synthetic embedding of the other part (its own set of COGs) included."""
    root = str(tmp_path / "root")
    built = CliRunner().invoke(app, ["build-cube", "--region", "demo", "--root", root, "--bounds", *DEMO_PART, "-q"])
    assert built.exit_code == 0, built.output
    sets = sorted(p.name for p in (tmp_path / "root" / "sources" / "aef-synthetic").iterdir())
    assert len(sets) == 1
    x0, y0, x1, y1 = (float(v) for v in DEMO_PART)
    other = [str(v) for v in (x0 + 1920, y0, x1 + 1920, y1)]  # another part: another set of COGs were it written
    before = files_state(tmp_path)
    refused = CliRunner().invoke(app, ["build-cube", "--region", "demo", "--root", root, "--bounds", *other, "-q"])
    line = one_error_line({"step": "build-cube", "exit_code": refused.exit_code, "output": refused.output})
    assert "cube.zarr exists and was built from a different catalog or bounds" in line, line
    assert files_state(tmp_path) == before
    metadata = tmp_path / "root" / "cube.zarr" / "zarr.json"
    metadata.write_text(metadata.read_text()[:40])
    before = files_state(tmp_path)
    refused = CliRunner().invoke(app, ["build-cube", "--region", "demo", "--root", root, "--bounds", *other, "-q"])
    line = one_error_line({"step": "build-cube", "exit_code": refused.exit_code, "output": refused.output})
    assert "cube.zarr: its Zarr metadata is damaged" in line, line
    assert files_state(tmp_path) == before
