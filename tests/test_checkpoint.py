"""Checkpoints are published as one unit, and a damaged one is one clear error naming the file."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_tensors

from geosoc.errors import GeosocError
from geosoc.io import storage
from geosoc.learn import checkpoint
from geosoc.learn.models import NetworkConfig, SoilNet
from geosoc.learn.normalisation import Normalisation
from tests.helpers import TAMPERING, TINY, RandomKiller

CONFIG = NetworkConfig(bands=["b0"], variables=["v0"], **TINY)
META = {"stage": "finetune", "normalisation": Normalisation(band_mean=[0.0], band_std=[1.0], climate_mean=[0.0],
                                                           climate_std=[1.0]).to_dict()}


def _epoch_model(epoch: int) -> tuple[SoilNet, torch.optim.Optimizer]:
    """A model and Adam state whose every value is `epoch`: a mix of two saves shows as two values."""
    model = SoilNet(CONFIG)
    optimizer = torch.optim.Adam(model.parameters())
    model(dict(patch=torch.zeros(2, 1, 8, 8), climate=torch.zeros(2, 4, 1))).sum().backward()
    optimizer.step()
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(epoch)
            for value in optimizer.state[param].values():
                value.fill_(epoch)
    return model, optimizer


def _save(url: str, epoch: int) -> None:
    model, optimizer = _epoch_model(epoch)
    checkpoint.save_model(url, model, CONFIG, {**META, "epoch": epoch}, optimizer,
                          {"epoch": epoch, "history": [], "best": 0.0, "run": {}})


def _saved_epoch(url: str) -> int:
    """The epoch of a checkpoint, after checking that its weights, optimizer state and info all agree."""
    model, meta = checkpoint.load_model(url)
    _, optimizer = _epoch_model(-1)
    info = checkpoint.load_state(url, optimizer)
    epoch = info["epoch"]
    assert meta["epoch"] == epoch
    assert all(torch.all(p == epoch) for p in model.parameters())
    assert all(torch.all(v == epoch) for s in optimizer.state.values() for v in s.values() if v.dim())
    return epoch


def test_a_save_replaces_the_whole_checkpoint_and_leaves_only_what_it_names(tmp_path: Path) -> None:
    url = str(tmp_path / "ckpt")
    _save(url, 1)
    _save(url, 2)
    assert _saved_epoch(url) == 2
    names = json.loads(Path(url, "config.json").read_text())["files"]
    assert set(names) == {checkpoint.MODEL_FILE, checkpoint.STATE_TENSORS, checkpoint.STATE_FILE}
    assert {p.name for p in Path(url).iterdir()} == {"config.json", *(e["object"] for e in names.values())}


def test_a_save_that_fails_before_publishing_leaves_the_old_checkpoint(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "ckpt")
    _save(url, 1)
    put = storage.put_bytes

    def fail_on_manifest(target: str, data: bytes) -> None:
        if target.endswith("config.json"):
            raise OSError("disk full")
        put(target, data)

    monkeypatch.setattr(storage, "put_bytes", fail_on_manifest)
    with pytest.raises(OSError):
        _save(url, 2)
    monkeypatch.undo()
    assert _saved_epoch(url) == 1  # epoch 2's objects are there, but nothing names them
    _save(url, 3)
    assert _saved_epoch(url) == 3
    assert len(list(Path(url).iterdir())) == 4  # and the next save removed them


SAVER = textwrap.dedent("""
    import sys
    from geosoc.io import storage
    from tests.test_checkpoint import _save
    put = storage.put_bytes

    def putting(url, data):  # every object and manifest a save writes is a moment worth killing after
        put(url, data)
        step(url.rsplit("/", 1)[-1])

    storage.put_bytes = putting
    print("ready", flush=True)
    url, epoch = sys.argv[1], int(sys.argv[2])
    while True:
        epoch += 1
        _save(url, epoch)
""")
WRITES = 4  # what a save writes: its three objects, then config.json


def _unnamed(url: str) -> set[str]:
    """What is in the checkpoint's folder that its config.json does not name: what a save killed midway left."""
    named = {entry["object"] for entry in json.loads(Path(url, "config.json").read_text())["files"].values()}
    return {p.name for p in Path(url).iterdir()} - named - {"config.json"}


def test_killed_at_any_moment_a_checkpoint_is_the_old_one_or_the_new(tmp_path: Path) -> None:
    """A process saving epoch after epoch is killed with SIGKILL: exactly after each write of a save in turn
    (the second save of its round, so one is whole), and at random moments after a random write. Every time,
    what is there loads, with weights, optimizer state and epoch from one save: the last one published before
    the kill. The next save tidies what the kills left."""
    url = str(tmp_path / "ckpt")
    _save(url, 0)
    rng, epoch = random.Random(0), 0
    exact = rng.sample(range(1, WRITES + 1), WRITES)  # each point between two writes once, in a random order
    with RandomKiller(SAVER) as killer:
        for write in exact:
            written = killer.kill_at_step([url, str(epoch)], WRITES + write)
            assert _saved_epoch(url) == epoch + written.count("config.json")  # the old one or the new
            # Beside it: the killed save's objects written so far, or once it was published, the old ones.
            assert len(_unnamed(url)) == (write if write < WRITES else WRITES - 1)
            epoch = _saved_epoch(url)
            written = killer.kill_after_step([url, str(epoch)], rng.randint(1, 2 * WRITES), rng.uniform(0, 0.1))
            assert _saved_epoch(url) >= epoch + written.count("config.json")
            epoch = _saved_epoch(url)
    assert epoch >= len(exact)
    _save(url, epoch + 1)
    assert len(list(Path(url).iterdir())) == WRITES


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_a_damaged_checkpoint_is_one_clear_error_naming_the_file(case: str, tmp_path: Path) -> None:
    url = str(tmp_path / "ckpt")
    _save(url, 1)
    damage, message = TAMPERING[case]
    damage(url)
    with pytest.raises(GeosocError, match=message) as raised:
        model, _ = checkpoint.load_model(url)
        _, optimizer = _epoch_model(-1)
        checkpoint.load_state(url, optimizer)
    assert url in str(raised.value) and "--fresh" in str(raised.value)


@pytest.mark.parametrize("content,message", [(b"[1, 2", "not valid JSON"), (b'{"epoch": "two"}', "expected an object"),
                                             (b'{"epoch": 1, "history": [], "param_groups": [], "state": {}}',
                                              "does not fit this model")])
def test_a_damaged_optimizer_state_is_one_clear_error(content: bytes, message: str, tmp_path: Path) -> None:
    url = str(tmp_path / "ckpt")
    model, optimizer = _epoch_model(1)
    checkpoint.save_files(url, {checkpoint.MODEL_FILE: checkpoint.weights_bytes(model),
                                checkpoint.STATE_TENSORS: save_tensors({}), checkpoint.STATE_FILE: content}, CONFIG, META)
    with pytest.raises(GeosocError, match=message):
        checkpoint.load_state(url, optimizer)
