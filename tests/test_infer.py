"""Inference: NIfTI round trips on real volumes, 2D images with band stitching, folder mode, every bad input.

Tiny models (widths 8..64) at a 32² training size keep this fast on 2 CPU cores.
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import vm_unet
from vm_unet.checkpoint import save_checkpoint
from vm_unet.datasets.intensity import normalize_intensity
from vm_unet.errors import UserError
from vm_unet.inference import Predictor, segment_image, segment_volume
from vm_unet.inference.cli import main
from vm_unet.inference.image2d import band_rows_for, normalizer_for
from vm_unet.inference.io import atomic_output

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NIFTI = DATA / "nifti"
TINY = dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], depths_decoder=[1, 1, 1, 1])
SIZE = [32, 32]
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "max_pixel_value": 255.0}

# Header fields an output label/probability map may legitimately change; everything else must be the input's.
DERIVED = {"datatype", "bitpix", "scl_slope", "scl_inter", "cal_min", "cal_max", "intent_code", "intent_name",
           "descrip", "dim", "pixdim", "vox_offset"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tiny models issue thousands of microsecond ops, and on a shared 2-core machine
    two spinning OpenMP threads made the same test ~30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ckpt(path: Path, *, in_chans: int, num_classes: int, preprocessing: dict, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = vm_unet.create_model("vmunet_isic", in_chans, num_classes, **TINY)
    if num_classes > 1:
        with torch.no_grad():  # an untrained head gives near-uniform softmax; spread the logits so labels vary
            model.head.bias.copy_(torch.linspace(-0.3, 0.3, num_classes))
    names = ["background", "lesion"] if num_classes == 1 else ["background"] + [f"c{i}" for i in range(1, num_classes)]
    pre = {"image_size": SIZE, "in_chans": in_chans, **preprocessing}  # preprocessing may override the size
    return save_checkpoint(path, model, model_name="vmunet_isic",
                           model_kwargs={"in_chans": in_chans, "num_classes": num_classes, **TINY},
                           preprocessing=pre, class_names=names)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    vol = {"input": "volume_slices", "axis": 2, "intensity": {"mode": "zscore", "nonzero": True}, "reorient": "RAS"}
    return SimpleNamespace(
        vol=_ckpt(d / "vol.pth", in_chans=1, num_classes=3, preprocessing=vol),
        vol_bin=_ckpt(d / "vol_bin.pth", in_chans=1, num_classes=1, preprocessing=vol, seed=1),
        rgb=_ckpt(d / "rgb.pth", in_chans=3, num_classes=1, preprocessing={"input": "image2d", "normalize": IMAGENET}),
        # 128² windows for the 2048² test: per-call overhead dominates tiny windows on CPU
        rgb128=_ckpt(d / "rgb128.pth", in_chans=3, num_classes=1,
                     preprocessing={"input": "image2d", "normalize": IMAGENET, "image_size": [128, 128]}),
        grey=_ckpt(d / "grey.pth", in_chans=1, num_classes=3,
                   preprocessing={"input": "image2d",
                                  "normalize": {"mean": [0.5], "std": [0.25], "max_pixel_value": 255.0}}),
    )


def _predictor(ckpt, device="cpu", **kw):
    from vm_unet.checkpoint import load_checkpoint

    model, meta = load_checkpoint(ckpt)
    return Predictor(model, meta, torch.device(device), **kw)


def _nifti(path: Path, data: np.ndarray, affine=None, qform_code=None, sform_code=None) -> Path:
    img = nib.Nifti1Image(data, np.diag([1.5, 2.0, 2.5, 1.0]) if affine is None else affine)
    if qform_code is not None:
        img.set_qform(img.affine, code=qform_code)
    if sform_code is not None:
        img.set_sform(img.affine if sform_code else None, code=sform_code)
    nib.save(img, str(path))
    return path


def _blob_volume(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(0, 0.2, shape).astype(np.float32)
    c = [s // 2 for s in shape]
    v[c[0] - shape[0] // 4: c[0] + shape[0] // 4, c[1] - shape[1] // 4: c[1] + shape[1] // 4] += 3.0
    return v


def _run(argv, capsys):
    rc = main([str(a) for a in argv] + ["--quiet"])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_same_grid(out_path: Path, in_path: Path):
    src, out = nib.load(str(in_path)), nib.load(str(out_path))
    assert out.shape[:3] == src.shape[:3]
    assert np.array_equal(out.affine, src.affine)
    sh, oh = src.header, out.header
    assert np.array_equal(oh.get_qform(), sh.get_qform()) and int(oh["qform_code"]) == int(sh["qform_code"])
    assert np.array_equal(oh.get_sform(), sh.get_sform()) and int(oh["sform_code"]) == int(sh["sform_code"])
    assert oh.get_zooms()[:3] == sh.get_zooms()[:3]
    for k in sh.keys():
        if k not in DERIVED:
            assert np.array_equal(sh[k], oh[k]), k
    return src, out


def _no_partial(folder: Path):
    """Nothing but summary.json: no label/probability files and no leftover temporaries."""
    left = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert [n for n in left if n != "summary.json"] == [], left


# ------------------------------------------------------------------------------------------ real volumes

@pytest.mark.parametrize("case", ["totalseg_example_ct/imagesTr/example_ct_sm.nii.gz",
                                  "totalseg_example_ct/imagesTs/example_mr_sm.nii.gz"])
def test_real_volume_round_trip(case, ckpts, tmp_path, capsys):
    src = NIFTI / case
    if not src.is_file():
        pytest.skip(f"{src} not available")
    rc, out, err = _run([src, "--checkpoint", ckpts.vol, "--out", tmp_path, "--probabilities"], capsys)
    assert rc == 0, err
    name = src.name
    _, lab = _assert_same_grid(tmp_path / name, src)
    assert lab.get_data_dtype() == np.uint8
    labels = np.asanyarray(lab.dataobj)
    assert labels.min() >= 0 and labels.max() <= 2 and len(np.unique(labels)) > 1
    _, prob = _assert_same_grid(tmp_path / name.replace(".nii.gz", "_probs.nii.gz"), src)
    p = prob.get_fdata(dtype=np.float32)
    assert p.shape == labels.shape + (3,)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
    assert np.array_equal(p.argmax(-1), labels)
    summary = json.loads((tmp_path / "summary.json").read_text())
    case_sum = summary["cases"][0]
    voxel_ml = float(np.prod(lab.header.get_zooms()[:3])) / 1000
    for i, (cname, v) in enumerate(case_sum["classes"].items()):
        assert v["voxels"] == int((labels == i).sum())
        assert v["ml"] == pytest.approx(v["voxels"] * voxel_ml, rel=1e-6)
    assert summary["failures"] == []


def test_brats_volume_resize_mode_lps(ckpts, tmp_path, capsys):
    """A BraTS-size volume stored L-P-S (reoriented to RAS for the model and back), whole slices resized."""
    src = NIFTI / "brats2015_deepmedic" / "imagesTr" / "brats_2013_pat0001_1.nii.gz"
    if not src.is_file():
        pytest.skip(f"{src} not available")
    assert nib.aff2axcodes(nib.load(str(src)).affine) != ("R", "A", "S")
    out = tmp_path / "pred.nii.gz"
    rc, _, err = _run([src, "-c", ckpts.vol_bin, "-o", out, "--mode", "resize", "--sw-batch-size", "32"], capsys)
    assert rc == 0, err
    _, lab = _assert_same_grid(out, src)
    labels = np.asanyarray(lab.dataobj)
    assert labels.shape == (240, 240, 155) and set(np.unique(labels)) <= {0, 1}


# ------------------------------------------------------------------------- correctness on synthetic volumes

def test_volume_labels_equal_direct_model(ckpts, tmp_path):
    """Slices that fit the training size run whole: labels must equal argmax(model(normalised slice))."""
    vol = _blob_volume((24, 20, 5))
    path = _nifti(tmp_path / "v.nii.gz", vol)
    pred = _predictor(ckpts.vol)
    res = segment_volume(path, pred, progress=False)
    chw = normalize_intensity(vol[None], {"mode": "zscore", "nonzero": True})
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(chw, 3, 0)))  # (Z, 1, X, Y): slices along axis 2
    with torch.no_grad():
        expect = pred.model(x).argmax(1).numpy().transpose(1, 2, 0)
    assert np.array_equal(res.labels, expect)
    # axis override: slicing along axis 0 must be a different computation with the same grid
    res0 = segment_volume(path, pred, axis=0, progress=False)
    assert res0.labels.shape == vol.shape and res0.summary["axis"] == 0


def test_any_orientation_gives_same_anatomy(ckpts, tmp_path):
    """The same voxels stored with permuted/flipped axes must give the same labels in world space."""
    vol = _blob_volume((22, 18, 6), seed=3)
    ras = _nifti(tmp_path / "ras.nii.gz", vol, affine=np.diag([2.0, 2.0, 3.0, 1.0]))
    # store as (Z, Y, X) reversed along Y, i.e. orientation S-P-R with the matching affine
    img = nib.load(str(ras))
    ornt = np.array([[2, 1], [1, -1], [0, 1]])
    from nibabel.orientations import apply_orientation, inv_ornt_aff

    data2 = apply_orientation(vol, ornt)
    aff2 = img.affine @ inv_ornt_aff(ornt, vol.shape)
    other = _nifti(tmp_path / "spr.nii.gz", np.ascontiguousarray(data2), affine=aff2)
    assert nib.aff2axcodes(aff2) != ("R", "A", "S")
    pred = _predictor(ckpts.vol)
    a = segment_volume(ras, pred, progress=False).labels
    b = segment_volume(other, pred, progress=False).labels
    assert b.shape == data2.shape
    assert np.array_equal(apply_orientation(a, ornt), b)


def test_qform_only_header_kept(ckpts, tmp_path, capsys):
    """Oblique qform (code 1) with no sform: the output must carry the same qform and codes, not invent an sform."""
    from nibabel.eulerangles import euler2mat

    aff = np.eye(4)
    aff[:3, :3] = euler2mat(0.3, 0.1, -0.2) @ np.diag([0.9, 0.9, 3.0])
    aff[:3, 3] = [-10, 20, 5]
    src = _nifti(tmp_path / "in.nii", _blob_volume((20, 26, 4)).astype(np.int16) * 100 + 7, affine=aff,
                 qform_code=1, sform_code=0)
    outdir = tmp_path / "out"
    rc, _, err = _run([src, "-c", ckpts.vol, "-o", outdir], capsys)
    assert rc == 0, err
    _, lab = _assert_same_grid(outdir / "in.nii", src)  # .nii input -> .nii output
    assert int(lab.header["sform_code"]) == 0 and int(lab.header["qform_code"]) == 1


@pytest.mark.parametrize("shape", [(37, 23, 3), (33, 65, 2)])
def test_odd_sizes_sliding_window(shape, ckpts, tmp_path):
    """Slices larger than the 32² training size (odd, non-multiples of 32) go through sliding windows."""
    path = _nifti(tmp_path / "odd.nii.gz", _blob_volume(shape))
    pred = _predictor(ckpts.vol_bin)
    res = segment_volume(path, pred, probabilities=True, progress=False)
    assert res.labels.shape == shape and res.probs.shape == shape
    assert set(np.unique(res.labels)) <= {0, 1}
    assert np.array_equal(res.labels, (res.probs > 0.5).astype(np.uint8))
    assert np.all((res.probs >= 0) & (res.probs <= 1))


def test_4d_channel_volume_and_channel_selection(tmp_path):
    """(X, Y, Z, 2) volumes feed 2-channel checkpoints; ``channels`` picks modalities like training."""
    vol = np.stack([_blob_volume((20, 20, 3), 0), _blob_volume((20, 20, 3), 1) * 2], -1)
    path = _nifti(tmp_path / "mm.nii.gz", vol)
    pre = {"input": "volume_slices", "axis": 2, "intensity": {"mode": "zscore"}, "reorient": "RAS"}
    two = _predictor(_ckpt(tmp_path / "two.pth", in_chans=2, num_classes=2, preprocessing=pre))
    assert segment_volume(path, two, progress=False).labels.shape == (20, 20, 3)
    one = _predictor(_ckpt(tmp_path / "one.pth", in_chans=1, num_classes=2, preprocessing={**pre, "channels": [1]}))
    assert segment_volume(path, one, progress=False).labels.shape == (20, 20, 3)


def test_tta_is_mean_of_flips(ckpts):
    pred, pred_tta = _predictor(ckpts.vol), _predictor(ckpts.vol, tta=True)
    x = torch.randn(2, 1, 32, 24)
    with torch.no_grad():
        manual = sum(torch.flip(pred(torch.flip(x, d)), d) for d in [(), (-1,), (-2,), (-2, -1)]) / 4
    torch.testing.assert_close(pred_tta(x), manual, atol=1e-5, rtol=1e-5)


def test_partial_nan_volume_is_repaired(ckpts, tmp_path):
    vol = _blob_volume((20, 20, 3))
    vol[:3] = np.nan
    res = segment_volume(_nifti(tmp_path / "nan.nii.gz", vol), _predictor(ckpts.vol), progress=False)
    assert res.labels.shape == vol.shape and "NaN" in res.summary["note"]


# ------------------------------------------------------------------------------------------------ 2D images

def _rgb_picture(h, w, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 140, (h, w, 3), dtype=np.uint8)
    yy, xx = np.ogrid[:h, :w]
    img[((yy - h / 2) ** 2 + (xx - w / 3) ** 2) < (min(h, w) / 4) ** 2] = (60, 20, 30)
    return img


def test_bands_match_single_pass(ckpts, tmp_path):
    """Band stitching must place rows correctly and leave no seams: banded == one sliding window over the image."""
    path = tmp_path / "pic.png"
    Image.fromarray(_rgb_picture(200, 150)).save(path)
    pred = _predictor(ckpts.rgb, overlap=0.5)
    one = segment_image(path, pred, probabilities=True, progress=False, max_band_mb=1e6)
    small = 0.3  # MB -> a few rows of 150 px per band: many bands
    assert band_rows_for(pred, 150, small) < 200
    many = segment_image(path, pred, probabilities=True, progress=False, max_band_mb=small)
    diff = np.abs(one.probs.astype(int) - many.probs.astype(int))
    assert diff.mean() < 1.0 and np.mean(one.labels != many.labels) < 0.005
    assert one.labels.shape == (200, 150)


def test_large_image_cli(ckpts, tmp_path, capsys):
    """2048² RGB picture through the CLI with small bands: mask, probability and overlay at the input size."""
    src = tmp_path / "big.jpg"
    Image.fromarray(_rgb_picture(2048, 2048, seed=2)).save(src, quality=95)
    out = tmp_path / "out"
    rc, _, err = _run([src, "-c", ckpts.rgb128, "-o", out, "--overlay", "--probabilities", "--overlap", "0",
                       "--sw-batch-size", "8", "--max-band-mb", "48"], capsys)  # 48 MB: several bands of rows
    assert rc == 0, err
    mask = np.asarray(Image.open(out / "big.png"))
    assert mask.shape == (2048, 2048) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    prob = np.asarray(Image.open(out / "big_prob.png"))
    assert np.array_equal(mask == 255, prob > 127) or np.mean((mask == 255) != (prob > 127)) < 1e-3
    assert np.asarray(Image.open(out / "big_overlay.png")).shape == (2048, 2048, 3)
    s = json.loads((out / "summary.json").read_text())["cases"][0]
    assert s["classes"]["lesion"]["pixels"] == int((mask == 255).sum())
    assert s["classes"]["background"]["pixels"] + s["classes"]["lesion"]["pixels"] == 2048 * 2048


def test_16bit_grey_png_matches_8bit_stretch(ckpts, tmp_path):
    """16-bit pictures are min-max stretched to 0..255 like the trainer's reader before normalising."""
    rng = np.random.default_rng(0)
    a16 = rng.integers(1000, 5000, (40, 36)).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(a16).save(p)
    pred = _predictor(ckpts.grey)
    res = segment_image(p, pred, progress=False)
    assert res.full_scale == 65535 and res.labels.shape == (40, 36) and res.labels.max() <= 2
    t16 = normalizer_for(pred, a16[..., None], 65535.0)(a16[..., None])
    stretched = (a16.astype(np.float64) - a16.min()) / (a16.max() - a16.min()) * 255
    expect = (stretched / 255 - 0.5) / 0.25
    np.testing.assert_allclose(t16[0, 0].numpy(), expect, atol=1e-4)


def test_multiclass_grey_image_outputs(ckpts, tmp_path, capsys):
    src = tmp_path / "grey.tif"
    Image.fromarray(_rgb_picture(48, 70)[..., 0]).save(src)
    out = tmp_path / "o.png"
    rc, _, err = _run([src, "-c", ckpts.grey, "-o", out, "--probabilities"], capsys)
    assert rc == 0, err
    mask = np.asarray(Image.open(out))
    assert mask.shape == (48, 70) and mask.max() <= 2
    for name in ("background", "c1", "c2"):
        assert (tmp_path / f"o_prob_{name}.png").is_file()


# ---------------------------------------------------------------------------------------- folder and failures

def test_folder_continues_past_bad_file(ckpts, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    _nifti(inp / "a.nii.gz", _blob_volume((20, 18, 3), 0))
    _nifti(inp / "c.nii.gz", _blob_volume((18, 20, 2), 1))
    (inp / "b.nii.gz").write_text("this is not a NIfTI file\n")
    (inp / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    rc, _, err = _run([inp, "-c", ckpts.vol, "-o", out], capsys)
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "c.nii.gz", "summary.json"]
    assert "b.nii.gz" in err and "1 of 3 input(s) failed" in err and "Traceback" not in err
    s = json.loads((out / "summary.json").read_text())
    assert [Path(c["input"]).name for c in s["cases"]] == ["a.nii.gz", "c.nii.gz"]
    assert [Path(f["input"]).name for f in s["failures"]] == ["b.nii.gz"]


def _bad_cases(tmp: Path, ckpts) -> dict:
    """name -> (input path, checkpoint, expected words in the message)."""
    good = _nifti(tmp / "good.nii.gz", _blob_volume((20, 20, 3)))
    raw = good.read_bytes()
    cases = {}
    (tmp / "empty.nii.gz").write_bytes(b"")
    cases["empty"] = (tmp / "empty.nii.gz", ckpts.vol, "empty")
    big = _nifti(tmp / "big.nii.gz", np.random.default_rng(0).normal(size=(40, 40, 30)).astype(np.float32))
    (tmp / "trunc.nii.gz").write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    cases["truncated"] = (tmp / "trunc.nii.gz", ckpts.vol, "truncated")
    (tmp / "text.nii.gz").write_text("hello\n" * 100)
    cases["text_as_nifti"] = (tmp / "text.nii.gz", ckpts.vol, "not a readable NIfTI")
    (tmp / "gz_text.nii.gz").write_bytes(gzip.compress(b"not a header" * 50))
    cases["gzipped_text"] = (tmp / "gz_text.nii.gz", ckpts.vol, "not a readable NIfTI")
    cases["4d_wrong_last_dim"] = (_nifti(tmp / "rgbvol.nii.gz", np.zeros((10, 10, 4, 3), np.float32) + np.arange(3)),
                                  ckpts.vol, "3 channels")
    cases["all_nan"] = (_nifti(tmp / "nan.nii.gz", np.full((10, 10, 3), np.nan, np.float32)), ckpts.vol, "NaN")
    cases["constant"] = (_nifti(tmp / "const.nii.gz", np.full((10, 10, 3), 7, np.int16)), ckpts.vol, "constant")
    cases["2d_nifti"] = (_nifti(tmp / "flat.nii.gz", np.ones((10, 10), np.float32)), ckpts.vol, "3D volume")
    cases["missing"] = (tmp / "nope.nii.gz", ckpts.vol, "no such file")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp / "grey.png")
    cases["grey_into_rgb"] = (tmp / "grey.png", ckpts.rgb, "expects 3 channel")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp / "rgb.png")
    cases["rgb_into_grey"] = (tmp / "rgb.png", ckpts.grey, "expects 1 channel")
    Image.fromarray(_rgb_picture(64, 64)).save(tmp / "full.png")
    (tmp / "trunc.png").write_bytes((tmp / "full.png").read_bytes()[:300])
    cases["truncated_png"] = (tmp / "trunc.png", ckpts.rgb, "corrupt or truncated")
    (tmp / "empty.png").write_bytes(b"")
    cases["empty_png"] = (tmp / "empty.png", ckpts.rgb, "empty")
    cases["volume_into_image_ckpt"] = (good, ckpts.rgb, "checkpoint segments images")
    torch.save({"weight": torch.zeros(3)}, tmp / "foreign.pth")
    cases["foreign_checkpoint"] = (good, tmp / "foreign.pth", "not a VM-UNet checkpoint")
    ck = Path(ckpts.vol).read_bytes()
    (tmp / "corrupt.pth").write_bytes(ck[: len(ck) // 3])
    cases["corrupt_checkpoint"] = (good, tmp / "corrupt.pth", "corrupt or truncated")
    (tmp / "text.pth").write_text("not a checkpoint")
    cases["text_checkpoint"] = (good, tmp / "text.pth", "checkpoint")
    assert raw  # the good file exists for the checkpoint cases
    return cases


BAD = ["empty", "truncated", "text_as_nifti", "gzipped_text", "4d_wrong_last_dim", "all_nan", "constant", "2d_nifti",
       "missing", "grey_into_rgb", "rgb_into_grey", "truncated_png", "empty_png", "volume_into_image_ckpt",
       "foreign_checkpoint", "corrupt_checkpoint", "text_checkpoint"]


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory, ckpts):
    return _bad_cases(tmp_path_factory.mktemp("bad"), ckpts)


@pytest.mark.parametrize("name", BAD)
def test_bad_input_one_line_no_output(name, bad_cases, tmp_path, capsys):
    src, ckpt, words = bad_cases[name]
    out = tmp_path / "out"
    rc, _, err = _run([src, "-c", ckpt, "-o", out], capsys)
    assert rc == 1
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors and words.lower() in errors[0].lower(), err
    _no_partial(out)


def test_output_folder_not_writable(ckpts, tmp_path, capsys):
    src = _nifti(tmp_path / "v.nii.gz", _blob_volume((20, 20, 3)))
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a folder below a regular file can never be created (also as root)
    rc, _, err = _run([src, "-c", ckpts.vol, "-o", blocker / "out"], capsys)
    assert rc == 1 and "not writable" in err and "Traceback" not in err


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "x.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_output(dest) as tmp:
            assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(dest) as tmp:
        tmp.write_bytes(b"done")
    assert dest.read_bytes() == b"done" and list(tmp_path.iterdir()) == [dest]


def test_failed_probability_write_removes_labels_too(ckpts, tmp_path, capsys, monkeypatch):
    """Outputs of a case are committed together: a crash while writing the second file leaves neither."""
    src = _nifti(tmp_path / "v.nii.gz", _blob_volume((20, 20, 3)))
    real_save = nib.save

    def flaky(img, fname):
        if "_probs" in str(fname):
            Path(fname).write_bytes(b"half")
            raise OSError(28, "No space left on device")
        return real_save(img, fname)

    monkeypatch.setattr(nib, "save", flaky)
    out = tmp_path / "out"
    rc, _, err = _run([src, "-c", ckpts.vol, "-o", out, "--probabilities"], capsys)
    assert rc == 1 and "No space left" in err
    _no_partial(out)


def test_input_never_overwritten(ckpts, tmp_path, capsys):
    src = tmp_path / "pic.png"
    Image.fromarray(_rgb_picture(40, 40)).save(src)
    before = src.read_bytes()
    rc, _, err = _run([src, "-c", ckpts.rgb, "-o", tmp_path], capsys)
    assert rc == 1 and "overwrite the input" in err and src.read_bytes() == before


def test_script_subprocess_clean_error(ckpts, tmp_path):
    """The real script (a fresh interpreter): one line, exit 1, no output for junk input. The success path of the
    same code runs in-process in the tests above (main() is what the script calls)."""
    junk = tmp_path / "junk.nii.gz"
    junk.write_text("definitely not nifti")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "infer.py"), str(junk), "-c", str(ckpts.vol),
                        "-o", str(tmp_path / "o"), "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")][0].count("junk.nii.gz") == 1
    assert not (tmp_path / "o" / "junk.nii.gz").exists()


# ------------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
def test_gpu_memory_does_not_grow_with_image_size(ckpts, tmp_path):
    """Windows on the GPU, stitching on the CPU: peak GPU memory at 4096² equals that at 1024²."""
    peaks = {}
    for side in (1024, 4096):
        src = tmp_path / f"p{side}.png"
        Image.fromarray(_rgb_picture(side, side, seed=side)).save(src, compress_level=1)
        pred = _predictor(ckpts.rgb128, device="cuda", sw_batch_size=16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        res = segment_image(src, pred, progress=False)
        torch.cuda.synchronize()
        peaks[side] = torch.cuda.max_memory_allocated()
        assert res.labels.shape == (side, side)
    assert peaks[4096] <= peaks[1024] * 1.05 + 2 ** 20, peaks


@pytest.mark.gpu
def test_gpu_matches_cpu(ckpts, tmp_path):
    src = _nifti(tmp_path / "v.nii.gz", _blob_volume((40, 36, 4)))
    cpu = segment_volume(src, _predictor(ckpts.vol), probabilities=True, progress=False)
    gpu_pred = _predictor(ckpts.vol, device="cuda", amp=False)
    gpu = segment_volume(src, gpu_pred, probabilities=True, progress=False)
    np.testing.assert_allclose(gpu.probs, cpu.probs, atol=1e-3)


def test_predictor_compile_matches_eager(ckpts, monkeypatch):
    """``compile=True`` (``--compile``) runs the network through torch.compile (aot_eager backend here: the
    wiring is ours, inductor is PyTorch's), gives the eager probabilities, and follows a replaced ``model``."""
    calls = []
    real_compile = torch.compile

    def compile_aot_eager(model, **kw):
        calls.append(model)
        return real_compile(model, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    x = torch.rand(2, 3, 40, 36)
    eager = _predictor(ckpts.rgb)(x)
    pred = _predictor(ckpts.rgb, compile=True)
    assert torch.allclose(pred(x), eager, atol=1e-5) and calls == [pred.model]
    pred(x)
    assert len(calls) == 1                       # compiled once, reused
    pred.model = torch.nn.Conv2d(3, 1, 1)
    assert pred(x).shape == (2, 1, 40, 36) and calls[-1] is pred.model


class _RecordingCompiled(torch.nn.Module):
    """Stands in for ``torch.compile``'s wrapper: records the batch sizes and options the network is run with."""

    def __init__(self, model, cuda_graphs, log):
        super().__init__()
        self._orig_mod, self.log = model, log
        log.append(("compiled", cuda_graphs))

    def forward(self, x):
        self.log.append(x.shape[0])
        return self._orig_mod(x)


def test_compiled_predictor_runs_one_batch_size(ckpts, monkeypatch, tmp_path):
    """A compiled network sees only ``sw_batch_size``-long batches (the short last one padded, its padding dropped),
    so a volume or a sliding window compiles, and captures a CUDA graph, once; probabilities equal eager ones."""
    import vm_unet.models

    log = []
    monkeypatch.setattr(vm_unet.models, "compile_model",
                        lambda model, cuda_graphs=False: _RecordingCompiled(model, cuda_graphs, log))
    x = torch.rand(5, 3, 32, 32)
    eager = _predictor(ckpts.rgb, sw_batch_size=3)(x)
    pred = _predictor(ckpts.rgb, sw_batch_size=3, compile=True)
    assert torch.allclose(pred(x), eager, atol=1e-5)
    assert log == [("compiled", False), 3, 3]            # 5 inputs: a batch of 3, then 2 padded to 3

    log.clear()                                          # sliding windows: 4 windows of 32² in a 48x40 input
    big = torch.rand(1, 3, 48, 40)
    assert torch.allclose(pred(big), _predictor(ckpts.rgb, sw_batch_size=3)(big), atol=1e-5)
    assert log == [3, 3]

    log.clear()
    src = _nifti(tmp_path / "v.nii.gz", _blob_volume((32, 32, 7)))
    vol = _predictor(ckpts.vol, sw_batch_size=4, compile=True)
    res = segment_volume(src, vol, probabilities=True, progress=False)
    ref = segment_volume(src, _predictor(ckpts.vol, sw_batch_size=4), probabilities=True, progress=False)
    np.testing.assert_allclose(res.probs, ref.probs, atol=1e-5)
    assert log == [("compiled", False), 4, 4]            # 7 slices: 4, then 3 padded to 4


def test_cuda_graphs_need_cuda(ckpts, tmp_path, capsys):
    with pytest.raises(UserError, match="needs a CUDA device"):
        _predictor(ckpts.rgb, cuda_graphs=True)
    src = tmp_path / "a.png"
    Image.fromarray(_rgb_picture(40, 36)).save(src)
    rc, out, err = _run([src, "-c", ckpts.rgb, "-o", tmp_path / "out", "--device", "cpu", "--cuda-graphs"], capsys)
    assert rc != 0 and err.strip().count("\n") == 0 and "CUDA" in err
    assert not (tmp_path / "out" / "a.png").exists()


@pytest.mark.gpu
def test_gpu_cuda_graphs_match_eager(ckpts, tmp_path):
    """``--cuda-graphs``: inductor captures the network (no cudagraph skips) and replays give the eager
    probabilities, also for the padded last batch and under TTA (four replays per batch)."""
    from torch._dynamo.utils import counters

    from vm_unet.kernels import triton_ss2d

    torch._dynamo.reset()
    triton_ss2d._route_plan_host.cache_clear()      # route maps are first built inside the warm-up and capture
    counters.clear()
    x = torch.rand(7, 3, 32, 32)
    for tta in (False, True):
        # the graphs run first, so nothing an eager run caches (e.g. route maps) is there before the capture
        graphs = _predictor(ckpts.rgb, device="cuda", amp=False, sw_batch_size=4, tta=tta, cuda_graphs=True)
        outs = [graphs(x) for _ in range(3)]             # warm-up, capture, replay
        eager = _predictor(ckpts.rgb, device="cuda", amp=False, sw_batch_size=4, tta=tta)(x)
        for out in outs:
            torch.testing.assert_close(out, eager, atol=2e-4, rtol=0)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    src = _nifti(tmp_path / "v.nii.gz", _blob_volume((40, 36, 9)))
    got = segment_volume(src, _predictor(ckpts.vol, device="cuda", amp=False, sw_batch_size=4, cuda_graphs=True),
                         probabilities=True, progress=False)
    ref = segment_volume(src, _predictor(ckpts.vol, device="cuda", amp=False, sw_batch_size=4), probabilities=True,
                         progress=False)
    np.testing.assert_allclose(got.probs, ref.probs, atol=2e-4)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def test_cli_compile_says_it_compiles(ckpts, monkeypatch, tmp_path, capsys):
    import vm_unet.models

    log = []
    monkeypatch.setattr(vm_unet.models, "compile_model",
                        lambda model, cuda_graphs=False: _RecordingCompiled(model, cuda_graphs, log))
    src = tmp_path / "a.png"
    Image.fromarray(_rgb_picture(40, 36)).save(src)
    rc = main([str(src), "-c", str(ckpts.rgb), "-o", str(tmp_path / "out"), "--device", "cpu", "--compile"])
    out = capsys.readouterr().out
    assert rc == 0 and "--compile: the first batch compiles the network" in out
    assert log[0] == ("compiled", False) and (tmp_path / "out" / "a.png").exists()
