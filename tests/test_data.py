"""Datasets: synthetic generator, ISIC folders, splits, NIfTI/Synapse slices, and every bad-input case."""
import copy
import functools
import os
import warnings
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from vm_unet.datasets import DeviceNormalize, build_datasets, collate, make_lesion, seeded_split
from vm_unet.datasets.folder import FolderPairs
from vm_unet.errors import DataError, UserError
from vm_unet.training.config import load_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def folder_cfg(root, **data):
    cfg = load_config("isic")
    cfg["data"].update({"root": str(root), "image_size": 32, **data})
    cfg["augment"] = []
    return cfg


def make_pairs(root, n=6, size=(40, 48), mask_suffix="_segmentation", ext=".jpg"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, m = make_lesion(i, 1, size)
        Image.fromarray(img).save(root / "images" / f"ISIC_{i:03d}{ext}")
        Image.fromarray(m * 255).save(root / "masks" / f"ISIC_{i:03d}{mask_suffix}.png")
    return root


def test_synthetic_deterministic_and_sane():
    a, ma = make_lesion(3, 7, 64)
    b, mb = make_lesion(3, 7, 64)
    c, _ = make_lesion(4, 7, 64)
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and not np.array_equal(a, c)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and set(np.unique(ma)) <= {0, 1}
    assert 0.01 < ma.mean() < 0.6
    # lesion is darker than skin, as in dermoscopy
    assert a[ma == 1].mean() < a[ma == 0].mean()


def test_seeded_split_disjoint_and_fixed():
    keys = [f"k{i}" for i in range(50)]
    s1, s2 = seeded_split(keys, 0.2, 0.1, 3), seeded_split(keys, 0.2, 0.1, 3)
    assert s1 == s2 and len(s1["val"]) == 10 and len(s1["test"]) == 5
    assert not set(s1["val"]) & set(s1["test"]) and not set(s1["train"]) & set(s1["val"])
    assert s1 != seeded_split(keys, 0.2, 0.1, 4)


def test_folder_pairs_suffix_and_transforms(tmp_path):
    root = make_pairs(tmp_path / "d", n=6)
    cfg = folder_cfg(root, split={"val_fraction": 0.34, "seed": 0})
    cfg["augment"] = [{"name": "HorizontalFlip", "p": 0.5}, {"name": "Affine", "rotate": [-30, 30], "p": 1.0}]
    b = build_datasets(cfg)
    assert len(b.train) == 4 and len(b.val) == 2
    item = b.train[(0, 123)]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (32, 32) and set(item["mask"].unique().tolist()) <= {0, 1}
    # augmentation is a function of the per-sample seed only (resume exactness)
    assert torch.equal(b.train[(0, 123)]["image"], item["image"])
    assert not torch.equal(b.train[(0, 124)]["image"], item["image"])
    assert b.preprocessing["image_size"] == [32, 32] and b.preprocessing["input"] == "image2d"


def _items(ds, seeds=(None, 5, 6)):
    return [ds[i if seed is None else (i, seed)] for i in range(len(ds)) for seed in seeds]


def _cache_files(d):
    return sorted(p.name for p in Path(d).rglob("*.npy"))


def _without_cache(cfg):
    cfg = copy.deepcopy(cfg)
    cfg["data"]["cache"] = False
    return cfg


def test_resized_cache_gives_what_decoding_gives(tmp_path, monkeypatch):
    # odd sizes larger and smaller than the training size, JPEG and PNG; augmentation on, as in training
    root = make_pairs(tmp_path / "d", n=3, size=(97, 131))
    for i in (3, 4):
        img, m = make_lesion(i, 1, (21, 17))
        Image.fromarray(img).save(root / "images" / f"ISIC_{i:03d}.png")
        Image.fromarray(m * 255).save(root / "masks" / f"ISIC_{i:03d}_segmentation.png")
    cfg = folder_cfg(root, image_size=[24, 40], split={"val_fraction": 0.4, "seed": 0})
    cfg["augment"] = [{"name": "Affine", "rotate": [-30, 30], "p": 1.0}, {"name": "ColorJitter", "p": 0.5}]
    cache_dir = Path(os.environ["VM_UNET_CACHE_DIR"])
    plain = build_datasets(_without_cache(cfg), for_training=True)
    assert not _cache_files(cache_dir)
    expect = [_items(plain.train), _items(plain.val, (None,))]
    first = build_datasets(cfg, for_training=True)
    stored = None
    for _ in range(2):          # decodes and stores, then reads the stored pairs
        ds = build_datasets(cfg, for_training=True) if stored else first
        if stored:
            monkeypatch.setattr(FolderPairs, "load", lambda *a: pytest.fail("decoded a stored pair"))
        for a_split, b_split in zip(expect, [_items(ds.train), _items(ds.val, (None,))]):
            for a, b in zip(a_split, b_split, strict=True):
                assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
                assert a["name"] == b["name"]
        stored = _cache_files(cache_dir)
        assert len(stored) == 2 * 5
    # an entry is a function of the file: a changed mask misses and is decoded again
    monkeypatch.undo()
    monkeypatch.setenv("VM_UNET_CACHE_DIR", str(cache_dir))
    mask_path = first.val.source.source.pairs[0][1]
    shape = np.asarray(Image.open(mask_path)).shape
    m = np.zeros(shape, np.uint8)
    m[2:9, 3:12] = 255
    Image.fromarray(m).save(mask_path)
    os.utime(mask_path, ns=(1, 1))
    again = build_datasets(cfg, for_training=True).val
    fresh = build_datasets(_without_cache(cfg), for_training=True).val
    assert torch.equal(again[0]["mask"], fresh[0]["mask"]) and again[0]["mask"].sum() > 0
    assert not torch.equal(again[0]["mask"], expect[1][0]["mask"])
    assert len(_cache_files(cache_dir)) == 2 * 5 + 2
    # data.cache: false reads the originals; a bad value is a one-line error
    cfg["data"]["cache"] = False
    assert type(build_datasets(cfg, for_training=True).val.source).__name__ == "FolderPairs"
    cfg["data"]["cache"] = "yes"
    _err(cfg, "data.cache must be true or false", for_training=True)


@pytest.mark.parametrize("kind", ["synthetic", "folder"])
def test_training_batches_are_compact_and_normalise_on_the_device(tmp_path, kind):
    cfg = folder_cfg(make_pairs(tmp_path / "d", n=6, size=(37, 53)), split={"val_fraction": 0.34, "seed": 0})
    if kind == "synthetic":
        cfg = load_config("synthetic")
        cfg["data"].update({"image_size": 24, "num_samples": {"train": 3, "val": 2}})
    cfg["augment"] = [{"name": "Affine", "rotate": [-30, 30], "p": 1.0}, {"name": "ColorJitter", "p": 1.0}]
    compact, plain = build_datasets(cfg, for_training=True), build_datasets(cfg)
    to_input = DeviceNormalize(compact.preprocessing, "cpu")
    assert compact.preprocessing == plain.preprocessing
    for split in ("train", "val"):
        for item in [(0, 7), (1, 8)] if split == "train" else [0, 1]:
            a, b = getattr(compact, split)[item], getattr(plain, split)[item]
            assert a["image"].dtype == torch.uint8 and a["mask"].dtype == torch.uint8
            batch = collate([a, a])
            torch.testing.assert_close(to_input(batch["image"])[0], b["image"], rtol=0, atol=1e-5)
            assert torch.equal(batch["mask"][0].long(), b["mask"])
    x = torch.rand(2, 1, 4, 4)
    assert to_input(x) is x          # float batches (volume slices) pass through


def test_resized_cache_that_cannot_be_written_warns_and_decodes(tmp_path):
    root = make_pairs(tmp_path / "d", n=3)
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("")
    cfg = folder_cfg(root, cache_dir=str(blocked / "cache"), split={"val_fraction": 0.34, "seed": 0})
    ds = build_datasets(cfg, for_training=True).train
    with pytest.warns(UserWarning, match="cannot store resized images"):
        a = ds[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # one warning, not one a sample
        b = ds[1]
    plain = build_datasets(folder_cfg(root, cache=False, split={"val_fraction": 0.34, "seed": 0}),
                           for_training=True).train
    assert torch.equal(a["image"], plain[0]["image"]) and torch.equal(b["mask"], plain[1]["mask"])


def test_train_val_test_subfolders(tmp_path):
    for s, n in (("train", 3), ("val", 2), ("test", 2)):
        make_pairs(tmp_path / s, n=n, mask_suffix="")
    b = build_datasets(folder_cfg(tmp_path))
    assert (len(b.train), len(b.val), len(b.test)) == (3, 2, 2)


def _err(cfg, match, for_training=False):
    with pytest.raises(UserError) as ei:
        build_datasets(cfg, for_training=for_training)
    msg = str(ei.value)
    assert "\n" not in msg and match in msg, msg
    return msg


@pytest.mark.parametrize("for_training", [False, True])
def test_bad_folder_inputs(tmp_path, for_training):
    err = functools.partial(_err, for_training=for_training)
    # image without mask
    r = make_pairs(tmp_path / "a")
    (r / "masks" / "ISIC_002_segmentation.png").unlink()
    assert "ISIC_002" in err(folder_cfg(r), "no matching mask")
    # mask without image
    r = make_pairs(tmp_path / "b")
    (r / "images" / "ISIC_001.jpg").unlink()
    err(folder_cfg(r), "mask has no matching image")
    # size mismatch
    r = make_pairs(tmp_path / "c")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(r / "masks" / "ISIC_003_segmentation.png")
    assert "ISIC_003" in err(folder_cfg(r), "differs from image")
    # non-binary mask for a binary task (grey JPEG-like edges)
    r = make_pairs(tmp_path / "d")
    m = np.zeros((40, 48), np.uint8)
    m[5:20, 5:20] = 255
    m[20, 5:20] = 128
    Image.fromarray(m).save(r / "masks" / "ISIC_004_segmentation.png")
    assert "ISIC_004" in err(folder_cfg(r), "not binary")
    build_datasets(folder_cfg(r, mask_threshold=127), for_training=for_training)  # the documented way out works
    # wrong label values for a multi-class task
    cfg = folder_cfg(r, mask_threshold=None)
    cfg["model"]["num_classes"] = 3
    cfg["data"]["class_names"] = ["a", "b", "c"]
    err(cfg, "num_classes=3")
    # empty folders
    (tmp_path / "e" / "images").mkdir(parents=True)
    (tmp_path / "e" / "masks").mkdir(parents=True)
    err(folder_cfg(tmp_path / "e"), "no image files")
    # corrupt image file
    r = make_pairs(tmp_path / "f", ext=".png")
    (r / "images" / "ISIC_000.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 20)
    assert "ISIC_000.png" in err(folder_cfg(r), "cannot read image")
    # missing folder / wrong layout
    err(folder_cfg(tmp_path / "nope"), "not found")
    (tmp_path / "g").mkdir()
    err(folder_cfg(tmp_path / "g"), "expected sub-folders")


def _nifti(path, a, affine=None):
    nib.save(nib.Nifti1Image(a, affine if affine is not None else np.eye(4)), str(path))


def make_msd(root, n=3, shape=(20, 24, 6)):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.normal(100, 20, shape).astype(np.float32)
        lab = np.zeros(shape, np.uint8)
        lab[5:12, 6:14, 2:4] = rng.integers(1, 5)
        _nifti(root / "imagesTr" / f"case{i}_0000.nii.gz", img)
        _nifti(root / "labelsTr" / f"case{i}.nii.gz", lab)
    return root


def nifti_cfg(root, **data):
    cfg = load_config("brats_slices")
    cfg["data"].update({"root": str(root), "image_size": 32, **data})
    cfg["model"]["in_chans"] = 1
    return cfg


def test_nifti_slices_weights_and_remap(tmp_path):
    root = make_msd(tmp_path / "v")
    b = build_datasets(nifti_cfg(root, split={"val_fraction": 0.34, "seed": 0}))
    assert len(b.train) == 2 * 6 and len(b.val) == 6  # axial (axis 2) slices of 20x24x6 volumes
    w = b.train.sample_weights
    assert sorted(set(w)) == [0.1, 1.0] and w.count(1.0) == 4  # 2 tumour slices per volume
    it = b.train[(2, 5)]
    assert it["image"].shape == (1, 32, 32) and set(it["mask"].unique().tolist()) <= {0, 1}
    assert b.preprocessing["axis"] == 2 and b.preprocessing["intensity"]["mode"] == "zscore"
    # without binarize, labels 1..4 do not fit a binary task
    _err(nifti_cfg(root, binarize=False), "label values range")


def test_nifti_bad_inputs(tmp_path):
    root = make_msd(tmp_path / "nan")
    a = np.asanyarray(nib.load(str(root / "imagesTr" / "case1_0000.nii.gz")).dataobj).copy()
    a[3, 3, 3] = np.nan
    _nifti(root / "imagesTr" / "case1_0000.nii.gz", a)
    assert "case1_0000" in _err(nifti_cfg(root), "NaN")
    root = make_msd(tmp_path / "shape")
    _nifti(root / "labelsTr" / "case0.nii.gz", np.zeros((5, 5, 5), np.uint8))
    _err(nifti_cfg(root), "differs from image shape")
    root = make_msd(tmp_path / "missing")
    (root / "labelsTr" / "case2.nii.gz").unlink()
    _err(nifti_cfg(root), "no matching label")
    root = make_msd(tmp_path / "corrupt")
    (root / "imagesTr" / "case0_0000.nii.gz").write_bytes(b"not a nifti")
    _err(nifti_cfg(root), "cannot read NIfTI")


def test_synapse_npz_and_h5(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "train_npz").mkdir()
    (tmp_path / "test_vol_h5").mkdir()
    for c in range(4):
        for s in range(3):
            lab = np.zeros((20, 20), np.float32)
            lab[4:9, 4:9] = rng.integers(0, 9)
            np.savez(tmp_path / "train_npz" / f"case{c:04d}_slice{s:03d}.npz",
                     image=rng.random((20, 20), dtype=np.float32), label=lab)
    with h5py.File(tmp_path / "test_vol_h5" / "case0099.npy.h5", "w") as f:
        f["image"] = rng.random((5, 20, 20), dtype=np.float32)
        f["label"] = rng.integers(0, 9, (5, 20, 20)).astype(np.float32)
    cfg = load_config("synapse")
    cfg["data"].update({"root": str(tmp_path), "image_size": 16, "split": {"val_fraction": 0.25, "seed": 0}})
    b = build_datasets(cfg)
    assert len(b.train) == 9 and len(b.val) == 3 and len(b.test) == 5  # split by case, never by slice
    assert {b.val[i]["case"] for i in range(3)} == {b.val[0]["case"]}
    assert b.train[0]["image"].shape == (1, 16, 16)
    cfg["model"]["num_classes"] = 4
    cfg["data"]["class_names"] = list("abcd")
    _err(cfg, "label values range")


@pytest.mark.skipif(not (SHARED / "isic2016_test_224").is_dir(), reason="shared data not present")
def test_isic2016_config_split():
    cfg = load_config("isic2016")
    cfg["data"]["root"] = str(SHARED / "isic2016_test_224")
    b = build_datasets(cfg)
    assert (len(b.train), len(b.val), b.test) == (303, 76, None)
    assert b.split == build_datasets(cfg).split  # fixed
    it = b.val[0]
    assert it["image"].shape == (3, 224, 224) and set(it["mask"].unique().tolist()) <= {0, 1}


@pytest.mark.skipif(not (SHARED / "nifti" / "brats2015_deepmedic").is_dir(), reason="shared data not present")
def test_brats_real_volume_loads():
    cfg = load_config("brats_slices")
    cfg["data"]["root"] = str(SHARED / "nifti" / "brats2015_deepmedic")
    cfg["data"]["image_size"] = 64
    b = build_datasets(cfg, splits=("val",))
    assert len(b.val) == 155
    m = torch.stack([b.val[i]["mask"] for i in range(0, 155, 5)])
    assert m.max() == 1 and 0 < m.float().mean() < 0.2


def test_albumentations_imported_without_its_network_check():
    """albumentations asks PyPI for its latest version when imported; building our transform turns that off (an
    explicit NO_ALBUMENTATIONS_UPDATE still wins). Fresh process: albumentations may be imported here already."""
    import os
    import subprocess
    import sys
    code = ("import urllib.request as u\n"
            "calls = []\n"
            "def no_net(self, *a, **k):\n"
            "    calls.append(a)\n"
            "    raise OSError('offline')\n"
            "u.OpenerDirector.open = no_net\n"
            "from vm_unet.datasets.transforms import PictureTransform\n"
            "PictureTransform((8, 8), (0.5,) * 3, (0.5,) * 3)\n"
            "print('calls', len(calls))\n")
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "calls 0" in out.stdout
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, NO_ALBUMENTATIONS_UPDATE="0"),
                         capture_output=True, text=True, timeout=120)
    assert "calls 1" in out.stdout     # the check the test blocks is real, and the user's choice is kept
