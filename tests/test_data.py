"""Datasets: synthetic generator, ISIC folders, splits, NIfTI/Synapse slices, and every bad-input case."""
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from vm_unet.datasets import build_datasets, make_lesion, seeded_split
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


def test_train_val_test_subfolders(tmp_path):
    for s, n in (("train", 3), ("val", 2), ("test", 2)):
        make_pairs(tmp_path / s, n=n, mask_suffix="")
    b = build_datasets(folder_cfg(tmp_path))
    assert (len(b.train), len(b.val), len(b.test)) == (3, 2, 2)


def _err(cfg, match):
    with pytest.raises(UserError) as ei:
        build_datasets(cfg)
    msg = str(ei.value)
    assert "\n" not in msg and match in msg, msg
    return msg


def test_bad_folder_inputs(tmp_path):
    # image without mask
    r = make_pairs(tmp_path / "a")
    (r / "masks" / "ISIC_002_segmentation.png").unlink()
    assert "ISIC_002" in _err(folder_cfg(r), "no matching mask")
    # mask without image
    r = make_pairs(tmp_path / "b")
    (r / "images" / "ISIC_001.jpg").unlink()
    _err(folder_cfg(r), "mask has no matching image")
    # size mismatch
    r = make_pairs(tmp_path / "c")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(r / "masks" / "ISIC_003_segmentation.png")
    assert "ISIC_003" in _err(folder_cfg(r), "differs from image")
    # non-binary mask for a binary task (grey JPEG-like edges)
    r = make_pairs(tmp_path / "d")
    m = np.zeros((40, 48), np.uint8)
    m[5:20, 5:20] = 255
    m[20, 5:20] = 128
    Image.fromarray(m).save(r / "masks" / "ISIC_004_segmentation.png")
    assert "ISIC_004" in _err(folder_cfg(r), "not binary")
    build_datasets(folder_cfg(r, mask_threshold=127))  # the documented way out works
    # wrong label values for a multi-class task
    cfg = folder_cfg(r, mask_threshold=None)
    cfg["model"]["num_classes"] = 3
    cfg["data"]["class_names"] = ["a", "b", "c"]
    _err(cfg, "num_classes=3")
    # empty folders
    (tmp_path / "e" / "images").mkdir(parents=True)
    (tmp_path / "e" / "masks").mkdir(parents=True)
    _err(folder_cfg(tmp_path / "e"), "no image files")
    # corrupt image file
    r = make_pairs(tmp_path / "f", ext=".png")
    (r / "images" / "ISIC_000.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 20)
    assert "ISIC_000.png" in _err(folder_cfg(r), "cannot read image")
    # missing folder / wrong layout
    _err(folder_cfg(tmp_path / "nope"), "not found")
    (tmp_path / "g").mkdir()
    _err(folder_cfg(tmp_path / "g"), "expected sub-folders")


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
