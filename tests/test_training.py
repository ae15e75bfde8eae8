"""Training loops: overfitting a tiny SampleSet, one-modality runs, checkpoints without pickle, resume, no
peeking at the test fold, and the Ray job path on a real local Ray head."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from geosoc.catalog import Catalog, FinetuneConfig, PretrainConfig
from geosoc.data.streaming import SampleData
from geosoc.learn import checkpoint
from geosoc.learn.models import SoilNet
from geosoc.learn.training import Context, augment_patches, finetune, finetune_network, pretrain, split
from tests.helpers import CPU, config_for, tiny_catalog_dict, tiny_sampleset


def test_augmentation_rotates_and_flips() -> None:
    patch = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    out = augment_patches(patch, torch.Generator().manual_seed(0))
    for i in range(2):
        variants = [torch.rot90(patch[i], k, dims=(1, 2)) for k in range(4)]
        variants += [torch.flip(v, dims=(2,)) for v in variants]
        assert any(torch.equal(out[i], v) for v in variants)


def test_finetune_overfits_a_tiny_sampleset(tmp_path: Path) -> None:
    url = tiny_sampleset(str(tmp_path / "s.zarr"))
    stage = FinetuneConfig(epochs=60, batch_size=16, learning_rate=3e-3, validation_fraction=0.1, patience=100)
    result = finetune(url, str(tmp_path / "ft"), config_for(url), stage, ctx=CPU)
    history = result["history"]
    assert history[-1]["train_loss"] < 0.25 * history[0]["train_loss"]
    model, meta = checkpoint.load_model(str(tmp_path / "ft"))
    assert meta["stage"] == "finetune" and meta["normalisation"]["log_target"] is True


@pytest.mark.parametrize("patches,climate", [(True, False), (False, True)])
def test_one_modality_pretrain_and_finetune(tmp_path: Path, patches: bool, climate: bool) -> None:
    url = tiny_sampleset(str(tmp_path / "s.zarr"), patches=patches, climate=climate)
    config = config_for(url)
    assert bool(config.bands) == patches and bool(config.variables) == climate
    pre = pretrain(url, str(tmp_path / "pre"), config, PretrainConfig(epochs=2, batch_size=8), ctx=CPU)
    assert np.isfinite(pre["best_val_loss"])
    ft = finetune(url, str(tmp_path / "ft"), config, FinetuneConfig(epochs=2, batch_size=8),
                  pretrained_url=str(tmp_path / "pre"), ctx=CPU)
    assert len(ft["history"]) == 2 and "val_rmse" in ft["history"][-1]


def test_pretrained_encoders_are_loaded(tmp_path: Path) -> None:
    url = tiny_sampleset(str(tmp_path / "s.zarr"))
    config = config_for(url)
    pretrain(url, str(tmp_path / "pre"), config, PretrainConfig(epochs=1, batch_size=8), ctx=CPU)
    ft = finetune(url, str(tmp_path / "ft"), config, FinetuneConfig(epochs=1, batch_size=8, learning_rate=1e-12),
                  pretrained_url=str(tmp_path / "pre"), ctx=CPU)
    pre_w, ft_w = checkpoint.load_weights(str(tmp_path / "pre")), checkpoint.load_weights(ft["checkpoint"])
    key = next(k for k in pre_w if k.startswith("image."))
    torch.testing.assert_close(pre_w[key], ft_w[key], atol=1e-6, rtol=0)  # ~zero lr: encoders as pretrained
    meta = json.loads((tmp_path / "ft" / "config.json").read_text())
    pre_meta = json.loads((tmp_path / "pre" / "config.json").read_text())
    assert meta["normalisation"]["band_mean"] == pre_meta["normalisation"]["band_mean"]


def test_from_scratch_the_region_network_without_its_weights(tmp_path: Path) -> None:
    """Fine-tuning from scratch builds the network of the region's pretrained encoders when there are some (the
    `supervised` of an evaluation is then the `ssl` network without pretraining), else the one for its labelled
    count; sizes the catalog sets win either way."""
    samples = tiny_sampleset(str(tmp_path / "samples.zarr"))
    encoders = str(tmp_path / "pretrain")
    config = config_for(samples)
    checkpoint.save_model(encoders, SoilNet(config), config, {"stage": "pretrain"})
    catalog = Catalog.model_validate(tiny_catalog_dict())
    alone = finetune_network(catalog, samples, None)
    assert (alone.climate_dim, alone.climate_layers, alone.embedding) == (64, 2, 32)  # 48 labelled: small
    like = finetune_network(catalog, samples, None, encoders)
    assert (like.climate_dim, like.climate_layers, like.image_dim, like.embedding) == (32, 1, 32, 16)
    catalog = Catalog.model_validate({**tiny_catalog_dict(), "model": {"climate": {"layers": 3}}})
    assert finetune_network(catalog, samples, None, encoders).climate_layers == 3


def test_checkpoint_round_trip_without_pickle(tmp_path: Path) -> None:
    url = tiny_sampleset(str(tmp_path / "s.zarr"))
    finetune(url, str(tmp_path / "ft"), config_for(url), FinetuneConfig(epochs=1, batch_size=8), ctx=CPU)
    files = {p.name for p in (tmp_path / "ft").iterdir()}
    assert {"config.json", "last"} <= files and checkpoint.has_file(str(tmp_path / "ft"), "model.safetensors")
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in (tmp_path / "ft").rglob("*"))
    import geosoc

    model, meta = geosoc.load_model(str(tmp_path / "ft"))
    again, meta2 = checkpoint.load_model(str(tmp_path / "ft"))
    for (k, v), (_, w) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(v, w), k
    data = SampleData(url)
    train, _ = split(data, 0.1, 0, None, labelled=True)
    assert meta["normalisation"] == meta2["normalisation"]
    assert np.isclose(meta["normalisation"]["target_mean"], np.log1p(data.target[train]).mean(), rtol=1e-6)


def test_resume_continues_from_last_epoch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = tiny_sampleset(str(tmp_path / "s.zarr"))
    config, out = config_for(url), str(tmp_path / "ft")
    finetune(url, out, config, FinetuneConfig(epochs=2, batch_size=8, patience=100), ctx=CPU)
    state = checkpoint.state_info(out + "/last")
    assert state["epoch"] == 2
    result = finetune(url, out, config, FinetuneConfig(epochs=4, batch_size=8, patience=100), ctx=CPU)
    assert [m["epoch"] for m in result["history"]] == [1, 2, 3, 4]  # epochs 1-2 not redone
    assert checkpoint.state_info(out + "/last")["epoch"] == 4
    again = finetune(url, out, config, FinetuneConfig(epochs=4, batch_size=8, patience=100), ctx=CPU)
    assert "nothing left to train" in caplog.text and len(again["history"]) == 4  # said, and nothing redone


KILLED_FINETUNE = """
import sys
from geosoc.io import storage
put = storage.put_bytes

def putting(url, data):  # every checkpoint write is a moment worth killing after: labelled "last/config.json" ...
    put(url, data)
    step("/".join(url.split("/")[-2:]))

storage.put_bytes = putting
import torch
torch.set_num_threads(1)  # as the test's own runs: sums in the same order
from geosoc.catalog import FinetuneConfig
from geosoc.learn.training import finetune
from tests.helpers import CPU, config_for
url, out = sys.argv[1:3]
print("ready", flush=True)
finetune(url, out, config_for(url), FinetuneConfig(epochs=10_000, batch_size=8, patience=10_000), ctx=CPU)
"""
EPOCH_WRITES = 6  # the most an epoch writes: the best model (weights, config) and the resumable state (4)


def test_finetune_killed_during_checkpoint_writes_resumes_cleanly(tmp_path: Path) -> None:
    """SIGKILL a fine-tuning run right after one of its checkpoint writes (after a whole epoch's, so each run
    gets somewhere), and at a random moment after one: the resumable state always loads whole, holds every epoch
    published before the kill, and the next run resumes it without a gap in the epochs and ends where an
    undisturbed run of as many epochs ends, to the bit (random streams and the patience count are part of the
    state)."""
    import random

    from tests.helpers import RandomKiller

    url = tiny_sampleset(str(tmp_path / "s.zarr"))
    out = str(tmp_path / "ft")
    last = out + "/last"
    rng = random.Random(2)
    with RandomKiller(KILLED_FINETUNE) as killer:
        for exact in (True, False, True):
            before = checkpoint.state_info(last)["epoch"] if checkpoint.is_checkpoint(last) else 0
            writes = rng.randint(EPOCH_WRITES + 1, 2 * EPOCH_WRITES)
            if exact:
                written = killer.kill_at_step([url, out], writes)
            else:
                written = killer.kill_after_step([url, out], writes, rng.uniform(0, 0.3))
            info = checkpoint.state_info(last)
            published = before + written.count("last/config.json")
            assert published > before, written  # a whole epoch's writes came before the kill
            assert info["epoch"] == published if exact else info["epoch"] >= published
            assert [m["epoch"] for m in info["history"]] == list(range(1, info["epoch"] + 1))
            model, _ = checkpoint.load_model(last)
            checkpoint.load_state(last, torch.optim.Adam(model.parameters()))
    done = checkpoint.state_info(out + "/last")["epoch"]
    assert done >= 1, "no epoch finished before the kills"
    stage = FinetuneConfig(epochs=done + 1, batch_size=8, patience=10_000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = finetune(url, out, config_for(url), stage, ctx=CPU)
        calm = finetune(url, str(tmp_path / "calm"), config_for(url), stage, ctx=CPU)
    finally:
        torch.set_num_threads(threads)
    assert [m["epoch"] for m in result["history"]] == list(range(1, done + 2))
    assert result["history"] == calm["history"]
    resumed, undisturbed = checkpoint.load_weights(out + "/last"), checkpoint.load_weights(str(tmp_path / "calm/last"))
    assert all(torch.equal(resumed[name], undisturbed[name]) for name in undisturbed)


def test_a_run_that_stopped_early_stays_stopped_when_run_again(tmp_path: Path) -> None:
    """The early-stopping count is part of the resumable state: running a finished run again trains nothing."""
    url = tiny_sampleset(str(tmp_path / "s.zarr"))
    stage = FinetuneConfig(epochs=60, batch_size=8, patience=1, learning_rate=0.05)
    first = finetune(url, str(tmp_path / "ft"), config_for(url), stage, ctx=CPU)
    assert len(first["history"]) < 60, "did not stop early"
    again = finetune(url, str(tmp_path / "ft"), config_for(url), stage, ctx=CPU)
    assert again["history"] == first["history"]


def test_validation_is_whole_spatial_blocks_large_enough_to_calibrate() -> None:
    """Fine-tuning's validation part (epoch choice, CQR offset) is whole blocks of the fold grid, none shared with
    the training part, and at least MIN_CALIBRATION samples, so the 90 % conformal quantile is not the largest
    residual; with every sample in one block it falls back to a random share by the same rule (at most half of
    the samples, for a survey too small for more)."""
    from types import SimpleNamespace

    from geosoc.learn.training import MIN_CALIBRATION

    rng = np.random.default_rng(1)
    n = 120
    x, y = rng.uniform(0, 4000, n), rng.uniform(0, 4000, n)
    data = SimpleNamespace(url="s.zarr", size=n, fold=np.arange(n) % 4, target=rng.uniform(5, 30, n), x=x, y=y,
                           block_size=1000.0)
    train, val = split(data, 0.1, 0, test_fold=3, labelled=True)  # type: ignore[arg-type]
    assert not (data.fold[np.concatenate([train, val])] == 3).any() and not set(train) & set(val)
    block = lambda rows: {(int(a // 1000), int(b // 1000)) for a, b in zip(x[rows], y[rows])}  # noqa: E731
    assert not block(train) & block(val)
    assert MIN_CALIBRATION <= len(val) <= (len(train) + len(val)) // 2
    assert math.ceil(0.9 * (len(val) + 1)) < len(val)  # the conformal rank is not the maximum
    one_block = SimpleNamespace(**{**vars(data), "block_size": 1e6})
    train, val = split(one_block, 0.1, 0, test_fold=3, labelled=True)  # type: ignore[arg-type]
    assert len(val) == MIN_CALIBRATION and len(train) == 90 - MIN_CALIBRATION  # 10 % would be 9: rank 9 of 9
    small = SimpleNamespace(**{**vars(one_block), "target": np.where(np.arange(n) < 40, data.target, np.nan)})
    train, val = split(small, 0.1, 0, test_fold=3, labelled=True)  # type: ignore[arg-type]
    assert len(val) == len(train) == 15  # 30 labelled outside the test fold


def test_validation_groups_are_disjoint_blocks_of_one_draw() -> None:
    """With G validation groups, part g of G is whole blocks that no other part and no training sample shares,
    each large enough to calibrate; part 1 of G is the single-group validation part (a run made before groups is
    the same run); without blocks the parts are disjoint random shares. Too many groups for the samples, or
    blocks that leave a part too small, are refused whichever part is asked for (the first member stops before
    training), naming the setting."""
    from types import SimpleNamespace

    from geosoc.errors import InputError
    from geosoc.learn.training import MIN_CALIBRATION

    rng = np.random.default_rng(2)
    n = 300
    x, y = rng.uniform(0, 6000, n), rng.uniform(0, 6000, n)
    data = SimpleNamespace(url="s.zarr", size=n, fold=np.arange(n) % 5, target=rng.uniform(5, 30, n), x=x, y=y,
                           block_size=1000.0)
    block = lambda rows: {(int(a // 1000), int(b // 1000)) for a, b in zip(x[rows], y[rows])}  # noqa: E731
    parts = [split(data, 0.1, 7, test_fold=4, labelled=True, group=g, groups=3) for g in range(3)]  # type: ignore[arg-type]
    for train, val in parts:
        assert MIN_CALIBRATION <= len(val) and not block(train) & block(val) and not (data.fold[val] == 4).any()
        assert len(train) + len(val) == int(np.sum(data.fold != 4))
    for a in range(3):
        for b in range(a + 1, 3):
            assert not block(parts[a][1]) & block(parts[b][1])
    np.testing.assert_array_equal(parts[0][1], split(data, 0.1, 7, test_fold=4, labelled=True)[1])  # type: ignore[arg-type]
    no_blocks = SimpleNamespace(**{**vars(data), "block_size": 0.0})
    shares = [split(no_blocks, 0.1, 7, test_fold=4, labelled=True, group=g, groups=3)[1] for g in range(3)]  # type: ignore[arg-type]
    assert [len(v) for v in shares] == [24] * 3 and len(set(np.concatenate(shares))) == 72
    shares = [split(no_blocks, 0.05, 7, test_fold=4, labelled=True, group=g, groups=3)[1] for g in range(3)]  # type: ignore[arg-type]
    assert [len(v) for v in shares] == [MIN_CALIBRATION] * 3 and len(set(np.concatenate(shares))) == 57  # not 12
    with pytest.raises(InputError, match="more than half.*validation_groups"):
        split(data, 0.2, 7, test_fold=4, labelled=True, group=0, groups=3)  # type: ignore[arg-type]
    uneven = SimpleNamespace(**{**vars(data), "x": np.where(np.arange(n) < 270, 500.0, 1500.0 + (np.arange(n) % 3) * 1000),
                                "y": np.full(n, 500.0)})  # one block of 270 samples, three of 10
    with pytest.raises(InputError, match="part.*under 19 samples.*validation_groups"):
        split(uneven, 0.05, 7, test_fold=None, labelled=True, group=0, groups=2)  # type: ignore[arg-type]


def test_test_fold_is_never_used(tmp_path: Path) -> None:
    url = tiny_sampleset(str(tmp_path / "s.zarr"))
    data = SampleData(url)
    train, val = split(data, 0.2, 0, test_fold=1, labelled=True)
    assert not (data.fold[np.concatenate([train, val])] == 1).any()
    assert not set(train) & set(val)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pretrain_and_finetune_on_cuda_streamed_then_resume_on_cpu(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path end to end: a streamed SampleSet through loader workers into pinned memory, bf16 autocast,
    fused Adam, device-side augmentation; the CUDA-trained state resumes on CPU."""
    monkeypatch.setenv("GEOSOC_IN_MEMORY_MIB", "0")
    url = tiny_sampleset(str(tmp_path / "s.zarr"), n=96)
    config = config_for(url)
    cuda = Context(device=torch.device("cuda"), progress=False, loader_workers=2)
    pre = pretrain(url, str(tmp_path / "pre"), config, PretrainConfig(epochs=2, batch_size=16), ctx=cuda)
    assert np.isfinite(pre["best_val_loss"]) and pre["history"][-1]["steps"] == 6
    stage = FinetuneConfig(epochs=3, batch_size=16, patience=100)
    result = finetune(url, str(tmp_path / "ft"), config, stage, pretrained_url=str(tmp_path / "pre"), ctx=cuda)
    assert np.isfinite(result["history"][-1]["val_loss"])
    model, meta = checkpoint.load_model(str(tmp_path / "ft"), device="cpu")  # CUDA-trained weights load on CPU
    assert next(model.parameters()).device.type == "cpu" and "calibration" in meta
    more = finetune(url, str(tmp_path / "ft"), config, stage.model_copy(update={"epochs": 4}),
                    pretrained_url=str(tmp_path / "pre"), ctx=CPU)  # fused CUDA optimizer state, resumed on CPU
    assert [m["epoch"] for m in more["history"]] == [1, 2, 3, 4]


def test_an_ensemble_trains_its_members_and_averages_them(trained_region: tuple[Path, str], tmp_path: Path) -> None:
    """`seeds=2`: member 0 at the checkpoint (naming 2 members), member 1 beside it with the next seed and the same
    validation blocks; one offset, written into both, makes the members' averaged interval cover the conformal
    share of those blocks; samples and maps get the members' calibrated quantiles averaged, on one numeric path."""
    from geosoc.catalog import load_catalog
    from geosoc.learn import ensemble
    from geosoc.learn.training import finetune_region, member_predictions, predict_samples
    from geosoc.maps.predictor import Predictor

    path, root = trained_region
    catalog = load_catalog(path=path).config
    out = str(tmp_path / "ensemble")
    result = finetune_region(catalog, root, out=out, test_fold=0, pretrained=False, seeds=2, ctx=CPU)
    assert result["members"] == 2 and len(result["member_val_loss"]) == 2
    meta = checkpoint.load_config(out)[1]
    urls = ensemble.member_urls(out, meta)
    assert urls == [out, f"{out}-m1"] and meta["seed"] == catalog.training.seed
    second = checkpoint.load_config(urls[1])[1]
    assert second["seed"] == catalog.training.seed + 1 and second["validation_seed"] == catalog.training.seed
    calibrations = [checkpoint.calibration_of(url) for url in urls]
    shared = [{k: c[k] for k in ("method", "offset", "members", "samples")} for c in calibrations]
    assert shared[0] == shared[1] and shared[0]["method"] == "cqr-ensemble"
    data = SampleData(f"{root}/samples/labelled.zarr")
    _, val = split(data, catalog.training.finetune.validation_fraction, catalog.training.seed, 0, labelled=True)
    lower, _, upper = predict_samples(out, data, val, CPU.device)
    covered = int(np.sum((data.target[val] >= lower - 1e-4) & (data.target[val] <= upper + 1e-4)))
    assert covered >= min(len(val), math.ceil(0.9 * (len(val) + 1))) and len(val) == calibrations[0]["samples"]
    samples = np.arange(12)
    members = member_predictions(out, data, samples, CPU.device)
    assert not np.allclose(members[0][1], members[1][1])  # other seeds, other networks
    combined = predict_samples(out, data, samples, CPU.device)
    for k in range(3):
        np.testing.assert_allclose(combined[k], (members[0][k] + members[1][k]) / 2, rtol=1e-6)
    predictor = Predictor(out, "cpu")
    rows = data.rows(samples)
    for i in range(len(samples)):  # each sample's patch as a one-cell window
        mapped = predictor.predict(rows["patch"][i], np.array([0]), np.array([0]), rows["climate"][i : i + 1])
        for name, k in (("soc_q05", 0), ("soc_median", 1), ("soc_q95", 2)):
            np.testing.assert_allclose(mapped[name][0], combined[k][i], rtol=1e-5, err_msg=name)


def test_ensemble_members_take_turns_among_validation_groups(trained_region: tuple[Path, str],
                                                              tmp_path: Path) -> None:
    """`validation_groups: 2` with 2 members: each holds out its own part of one block draw (recorded in what
    defines its run), and the one offset, written into both, is the conformal quantile of both parts' scores,
    each part scored by the member that held it out: together they cover the conformal share of its samples."""
    from geosoc.catalog import load_catalog
    from geosoc.learn import ensemble
    from geosoc.learn.training import finetune_region, forward_all, member_predictions
    from geosoc.stats.calibration import conformal_quantile, interval

    path, root = trained_region
    catalog = load_catalog(path=path).config
    finetune = catalog.training.finetune.model_copy(update={"validation_groups": 2, "validation_fraction": 0.05})
    catalog = catalog.model_copy(update={"training": catalog.training.model_copy(update={"finetune": finetune})})
    out = str(tmp_path / "ensemble")
    finetune_region(catalog, root, out=out, test_fold=0, pretrained=False, seeds=2, ctx=CPU)
    urls = ensemble.member_urls(out, checkpoint.load_config(out)[1])
    metas = [checkpoint.load_config(url)[1] for url in urls]
    assert [m.get("validation_part") for m in metas] == [None, 2]  # part 1: the single part, an older run's
    data = SampleData(f"{root}/samples/labelled.zarr")
    vals = [split(data, 0.05, catalog.training.seed, 0, labelled=True, group=g, groups=2)[1] for g in range(2)]
    assert not set(vals[0]) & set(vals[1])
    calibrations = [checkpoint.calibration_of(url) for url in urls]
    assert calibrations[0]["offset"] == calibrations[1]["offset"] and calibrations[0]["parts"] == 2
    assert calibrations[0]["samples"] == len(vals[0]) + len(vals[1])
    members, _ = ensemble.load_members(out, CPU.device)
    scores = []  # one member per part: each sample's least covering offset is its plain CQR score
    for member, val in zip(members, vals, strict=True):
        z, _ = forward_all(member.model, data, val, member.norm, CPU.device, 64)
        lower, _, upper = interval(z, member.model.config.quantiles, 0.0)
        observed = member.norm.encode_target(data.target[val])
        scores.append(np.maximum(lower - observed, observed - upper))
    assert calibrations[0]["offset"] == pytest.approx(conformal_quantile(np.concatenate(scores), 0.9), abs=1e-6)
    covered = 0
    for member, val in enumerate(vals):
        lower, _, upper = member_predictions(out, data, val, CPU.device)[member]
        covered += int(np.sum((data.target[val] >= lower - 1e-4) & (data.target[val] <= upper + 1e-4)))
    n = len(vals[0]) + len(vals[1])
    assert covered >= min(n, math.ceil(0.9 * (n + 1)))


def test_a_single_run_keeps_the_identity_older_runs_saved(tmp_path: Path) -> None:
    """A run that is no ensemble member, with the default validation share, saves only the keys every geosoc saved
    (`RUN_KEYS`): the ensemble's validation draw and part and the share are added only where set, so a run
    left half-done by an older version resumes. Pretraining records its share too."""
    from geosoc.errors import IncompatibleError
    from geosoc.learn.training import RUN_KEYS

    url = tiny_sampleset(str(tmp_path / "s.zarr"))
    out = str(tmp_path / "ft")
    finetune(url, out, config_for(url), FinetuneConfig(epochs=1, batch_size=8), test_fold=0, ctx=CPU)
    assert set(checkpoint.state_info(f"{out}/last")["run"]) == set(RUN_KEYS)
    pre = str(tmp_path / "pre")
    pretrain(url, pre, config_for(url), PretrainConfig(epochs=1, batch_size=8), ctx=CPU)
    assert set(checkpoint.state_info(f"{pre}/last")["run"]) == set(RUN_KEYS)
    with pytest.raises(IncompatibleError, match=r"this one is pretrain of .*, validation share 0.3\."):
        pretrain(url, pre, config_for(url), PretrainConfig(epochs=2, batch_size=8, validation_fraction=0.3), ctx=CPU)


def test_resume_takes_everything_from_one_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another save published into last/ right after the resume read config.json (its objects first, its
    config.json last, as a writer publishes) changes nothing: weights, optimizer state and epoch all come from
    the save that was read, so the run ends where an undisturbed one ends, to the bit."""
    import shutil

    url = tiny_sampleset(str(tmp_path / "s.zarr"))
    stage = FinetuneConfig(epochs=2, batch_size=16, patience=100)
    finetune(url, str(tmp_path / "a"), config_for(url), stage, ctx=CPU)
    other = FinetuneConfig(epochs=3, batch_size=16, patience=100, learning_rate=0.01)  # the same run, other saves
    finetune(url, str(tmp_path / "b"), config_for(url), other, ctx=CPU)
    undisturbed = finetune(url, str(tmp_path / "c"), config_for(url), stage.model_copy(update={"epochs": 3}), ctx=CPU)
    snapshot = checkpoint.snapshot

    def then_another_save(where: str) -> dict:
        document = snapshot(where)
        if where == str(tmp_path / "a" / "last"):
            for item in sorted((tmp_path / "b" / "last").iterdir(), key=lambda p: p.name == "config.json"):
                shutil.copy(item, Path(where) / item.name)
        return document

    monkeypatch.setattr(checkpoint, "snapshot", then_another_save)
    resumed = finetune(url, str(tmp_path / "a"), config_for(url), stage.model_copy(update={"epochs": 3}), ctx=CPU)
    assert [m["epoch"] for m in resumed["history"]] == [1, 2, 3]
    assert resumed["history"] == undisturbed["history"]
    assert checkpoint.state_info(str(tmp_path / "a" / "last"))["epoch"] == 3
