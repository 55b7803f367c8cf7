"""The models shipped inside the package: each loads by name, matches its JSON record, and samples."""
import json

import pytest
import torch

import ddpm_nb
from ddpm_nb.shipped import ASSETS, PRETRAINED, pretrained_info, pretrained_path
from ddpm_nb.checkpoint import CheckpointError

EXPECTED = {  # name -> (dataset, image size, channels, classes)
    "fashion-quick-cond": ("fashion-mnist", 28, 1, 10),
    "flowers-cpu-cond": ("flowers102", 32, 3, 102),
}


def test_every_expected_model_is_registered_and_present():
    assert set(EXPECTED) <= set(PRETRAINED)
    for name in PRETRAINED:
        path = pretrained_path(name)
        assert path.parent == ASSETS and path.stat().st_size <= 10e6  # <= 10 MB each (the wheel stays lean)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_model_loads_matches_its_record_and_samples(name):
    dataset, size, channels, classes = EXPECTED[name]
    model, diffusion, cfg = ddpm_nb.pretrained(name, device="cpu")
    assert (cfg.data.dataset, cfg.unet.image_size, cfg.unet.in_channels, cfg.unet.num_classes) == \
           (dataset, size, channels, classes)
    assert not model.training and all(p.device.type == "cpu" for p in model.parameters())
    info = pretrained_info(name)
    for key in ("trained_with", "steps", "batch_size", "device", "date", "final_val_loss_ema"):
        assert info.get(key) not in (None, ""), key
    assert info["file"] == pretrained_path(name).name
    from ddpm_nb.sample import sample

    y = torch.arange(4) % classes
    x = sample(model, diffusion, 4, method="ddim", steps=3, y=y, generator=torch.Generator().manual_seed(0),
               progress=False)
    assert x.shape == (4, channels, size, size) and torch.isfinite(x).all() and x.abs().max() <= 1.0


def test_unknown_shipped_name_lists_the_available_ones():
    with pytest.raises(CheckpointError, match="available: fashion-quick-cond, flowers-cpu-cond"):
        ddpm_nb.pretrained("flowers-huge")


def test_json_records_are_valid_json_beside_each_file():
    for name in PRETRAINED:
        record = json.loads(pretrained_path(name).with_suffix(".json").read_text())
        assert record["load_with"] == f'ddpm_nb.pretrained("{name}")'


def test_lesson_model_maps_datasets_and_falls_back_only_in_tiny_mode(tmp_path, monkeypatch, capsys):
    from ddpm_nb import shipped

    model, diffusion, cfg = shipped.lesson_model("flowers102", device="cpu")
    assert (cfg.unet.in_channels, cfg.unet.num_classes) == (3, 102)
    assert shipped.lesson_model("flowers", device="cpu")[2] == cfg   # the lessons' old spelling still works
    with pytest.raises(ValueError, match=r"DATASET must be one of fashion-mnist, flowers102, got 'cifar'"):
        shipped.lesson_model("cifar")
    monkeypatch.setattr(shipped, "ASSETS", tmp_path / "trimmed")              # an install without the model files
    with pytest.raises(CheckpointError, match="is missing from this installation"):
        shipped.lesson_model("fashion-mnist", device="cpu")
    import ddpm_nb.config

    tiny = ddpm_nb.config.preset
    monkeypatch.setattr(ddpm_nb.config, "preset", lambda name: tiny(name).override(      # 3 steps, not 30: seconds
        {"train.steps": 3, "train.sample_every": 3, "train.eval_every": 3, "train.ckpt_every": 3}))
    model, diffusion, cfg = shipped.lesson_model("fashion-mnist", device="cpu", tiny=True, fallback_dir=tmp_path)
    assert "TINY mode trains a tiny class-conditional model" in capsys.readouterr().out
    assert (cfg.unet.num_classes, cfg.unet.in_channels, cfg.data.class_cond) == (10, 1, True)
    assert not model.training and (tmp_path / "fallback-tiny-fashion-mnist" / "checkpoints").is_dir()
    assert shipped.class_name("fashion-mnist", 9) == "Ankle boot" and shipped.class_name("flowers102", 7) == "bird of paradise"


def test_fid_table_record_writes_the_newest_rows_into_the_models_json(tmp_path, monkeypatch):
    import shutil

    from benchmarks import fid_table
    from ddpm_nb import shipped

    name = "flowers-cpu-cond"
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / PRETRAINED[name][0]).write_bytes(b"weights")
    shutil.copy(ASSETS / PRETRAINED[name][0].replace(".pt", ".json"), assets)
    monkeypatch.setattr(shipped, "ASSETS", assets)
    base = dict(model=name, split="all", kid_mean=0.05, kid_std=0.002, kid_subset=1000)
    rows = [dict(base, what="DDIM-50", n=2000, fid=99.0, steps=50, eta=0.0),
            dict(base, what="real vs real (floor)", n=2000, fid=17.0),
            dict(base, model="fashion-quick-cond", what="DDIM-50", n=2000, fid=30.0),   # another model: left out
            dict(base, what="DDIM-50", n=2000, fid=98.8, steps=50, eta=0.0)]           # newer: replaces the first
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fid_table.main([name, "--record", "--out", str(rows_file)])
    info = json.loads((assets / "flowers_cpu_cond.json").read_text())
    got = {(r["what"], r["n"]): r["fid"] for r in info["quality"]["rows"]}
    assert got == {("DDIM-50", 2000): 98.8, ("real vs real (floor)", 2000): 17.0}
    assert info["steps"] == 5000 and "--record" not in info["quality"]["measured_with"]
    with pytest.raises(SystemExit, match="no rows for 'fashion-quick-cond'"):
        rows_file.write_text(json.dumps(rows[0]) + "\n")
        fid_table.main(["fashion-quick-cond", "--record", "--out", str(rows_file)])


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_json_records_carry_the_inception_quality_with_its_floor(name):
    rows = {(r["what"], r["n"]): r for r in pretrained_info(name)["quality"]["rows"]}
    model, floor = rows[("DDIM-50", 2000)], rows[("real vs real (floor)", 2000)]
    assert 0 < floor["fid"] < model["fid"] and abs(floor["kid_mean"]) < model["kid_mean"]
    assert {("DDIM-10", 500), ("DDIM-20", 500), ("DDIM-50", 500), ("DDIM-100", 500)} <= set(rows)


@pytest.mark.parametrize("stem", ["fashion_quick_cond", "flowers_cpu_cond", "fashion_mnist_classifier"])
def test_each_shipped_file_matches_its_record(stem):
    import hashlib

    from ddpm_nb.shipped import ASSETS

    record = json.loads((ASSETS / f"{stem}.json").read_text())
    data = (ASSETS / f"{stem}.pt").read_bytes()
    assert record["file"] == f"{stem}.pt" and record["sha256"] == hashlib.sha256(data).hexdigest()


def test_write_record_describes_the_file_it_sits_beside(tmp_path):
    import hashlib

    from ddpm_nb.shipped import write_record

    model = tmp_path / "m.pt"
    model.write_bytes(b"weights v1")
    write_record(model, {"what": "a model", "quality": {"rows": [1]}, "sha256": "forged"})
    model.write_bytes(b"weights v2")
    path = write_record(model, {"what": "retrained"})                 # quality survives, the hash follows the file
    record = json.loads(path.read_text())
    assert record == {"what": "retrained", "quality": {"rows": [1]}, "file": "m.pt",
                      "sha256": hashlib.sha256(b"weights v2").hexdigest(), "size_mb": 0.0}
