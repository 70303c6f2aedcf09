"""End-to-end training on CPU with tiny models: outputs, exact resume, evaluation, CLI errors, NaN handling."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vm_unet.checkpoint import load_checkpoint, read_checkpoint
from vm_unet.training import load_config, train
from vm_unet.training.evaluate import evaluate_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "depths_decoder": [1, 1, 1, 1], "d_state": 2,
        "drop_path_rate": 0.1}  # drop path on: resume must restore the RNG that draws it


def tiny_cfg(out, **train_kw):
    cfg = load_config("synthetic")
    cfg["out"] = str(out)
    cfg["model"]["overrides"] = dict(TINY)
    cfg["data"].update({"image_size": 32, "num_samples": {"train": 12, "val": 4}})
    cfg["train"].update({"epochs": 2, "batch_size": 4, "warmup_steps": 2, "overlays": 2, **train_kw})
    return cfg


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("VMUNET_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted 2-epoch run with EMA, shared by the tests below (CPU time is precious)."""
    import os

    os.environ["VMUNET_NO_PROGRESS"] = "1"
    return train(tiny_cfg(tmp_path_factory.mktemp("full"), ema=0.9))


def test_train_synthetic_outputs(full_run):
    run = full_run
    for f in ("last.pt", "best.pt", "metrics.csv", "metrics.json", "curves.png", "config.yaml",
              "overlays/epoch_0001.png", "overlays/epoch_0002.png"):
        assert (run / f).is_file(), f
    hist = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and hist[-1]["step"] == 6
    assert 0 <= hist[-1]["val_mean_dice"] <= 1 and 0 <= hist[-1]["val_pooled_dsc"] <= 1
    model, meta = load_checkpoint(run / "best.pt")
    assert meta["preprocessing"]["image_size"] == [32, 32] and meta["task"] == "binary"
    assert model(torch.zeros(1, 3, 40, 36)).shape == (1, 1, 40, 36)
    ts = read_checkpoint(run / "last.pt")["training_state"]
    assert ts["epoch"] == 2 and ts["global_step"] == 6 and "ema" in ts
    assert not list(run.glob(".*tmp*"))


def _stop_after_epoch_one_then_resume(cfg) -> Path:
    """Train ``cfg`` until a crash at the end of epoch 1, resume the run from its ``last.pt``; the run folder."""
    class Crash(Exception):
        pass

    def crash(info):
        if info["epoch"] == 1:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, callbacks={"on_epoch_end": crash})
    (partial,) = list(Path(cfg["out"]).iterdir())
    resumed = train(read_checkpoint(partial / "last.pt")["extra"]["config"], resume=partial)
    assert resumed == partial
    return resumed


def test_resume_is_exact(tmp_path, full_run):
    full = full_run
    resumed = _stop_after_epoch_one_then_resume(tiny_cfg(tmp_path / "b", ema=0.9))
    a, b = read_checkpoint(full / "last.pt"), read_checkpoint(resumed / "last.pt")
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for k in a["training_state"]["model"]:
        assert torch.equal(a["training_state"]["model"][k], b["training_state"]["model"][k]), k
    sa, sb = a["training_state"]["optimizer"]["state"], b["training_state"]["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert a["training_state"]["scheduler"]["last_epoch"] == b["training_state"]["scheduler"]["last_epoch"] == 6
    ha = json.loads((full / "metrics.json").read_text())["history"]
    hb = json.loads((resumed / "metrics.json").read_text())["history"]
    assert ha == hb


def test_worker_processes_give_the_same_run(tmp_path, full_run):
    # the run's loader workers outlive an epoch (persistent): each epoch must still get its own order and seeds;
    # HD95 computed in worker processes must land in the same rows
    cfg = tiny_cfg(tmp_path, ema=0.9, metric_workers=1)
    cfg["data"]["num_workers"] = 2
    run = train(cfg)
    a, b = read_checkpoint(full_run / "last.pt"), read_checkpoint(run / "last.pt")
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    ha = json.loads((full_run / "metrics.json").read_text())["history"]
    hb = json.loads((run / "metrics.json").read_text())["history"]
    assert ha == hb and all(h["val_mean_hd95"] is not None for h in hb)


def test_metric_workers_option():
    from vm_unet.errors import ConfigError
    from vm_unet.training.trainer import metric_workers

    assert metric_workers({"metric_workers": "auto"}, "cpu") == 0
    assert 0 <= metric_workers({"metric_workers": "auto"}, "cuda") <= 8
    assert metric_workers({"metric_workers": 3}, "cpu") == 3
    assert metric_workers({"metric_workers": 3, "hd95": False}, "cuda") == 0
    for bad in (-1, 1.5, "two", True):
        with pytest.raises(ConfigError, match="train.metric_workers"):
            metric_workers({"metric_workers": bad}, "cuda")


def test_failed_checkpoint_write_is_reported_and_leaves_no_run(tmp_path, monkeypatch):
    # checkpoints are written on a background thread: its error must still end the run, and a run whose first
    # checkpoint never landed leaves no folder behind
    from vm_unet.training import trainer

    def full_disk(path, payload):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(trainer, "write_checkpoint", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(tiny_cfg(tmp_path, epochs=1))
    assert not any(tmp_path.iterdir())


def test_sampler_skip_resumes_mid_epoch():
    from vm_unet.training.sampling import TrainSampler

    s = TrainSampler(10, seed=3, rank=1, world=2)
    s.set_epoch(4)
    whole = list(s)
    s.set_epoch(4, skip=2)
    assert list(s) == whole[2:] and len(s) == 3
    s.set_epoch(5)
    assert list(s) != whole
    w = TrainSampler(10, seed=3, weights=[1.0] * 5 + [0.0] * 5)
    w.set_epoch(0)
    assert all(i < 5 for i, _ in w)


def test_evaluate_outputs(tmp_path, full_run):
    run = full_run
    s = evaluate_checkpoint(run / "best.pt", out=tmp_path / "ev")
    ev = tmp_path / "ev"
    rows = (ev / "per_case.csv").read_text().splitlines()
    assert rows[0].startswith("name,case,dice,iou,hd95") and len(rows) == 1 + 4
    js = json.loads((ev / "summary.json").read_text())
    assert js["n_items"] == 4 and 0 <= js["pooled_dsc"] <= 1 and "mean_dice" in js
    assert list((ev / "overlays").glob("*.png"))
    # evaluation on synthetic val reproduces the trainer's validation of the best epoch (same resolution there)
    best = json.loads((run / "metrics.json").read_text())["best_val_mean_dice"]
    assert abs(best - s["mean_dice"]) < 1e-6


@pytest.mark.skipif(not (SHARED / "isic2016_test_224").is_dir(), reason="shared data not present")
def test_train_and_evaluate_on_real_isic_pairs(tmp_path):
    src = SHARED / "isic2016_test_224"
    root = tmp_path / "isic"
    for d in ("images", "masks"):
        (root / d).mkdir(parents=True)
    for name in sorted(p.name for p in (src / "images").iterdir())[:8]:
        shutil.copy(src / "images" / name, root / "images" / name)
        shutil.copy(src / "masks" / name, root / "masks" / name.replace(".png", "_segmentation.png"))
    cfg = load_config("isic")
    cfg["model"]["overrides"] = dict(TINY)
    cfg["out"] = str(tmp_path / "runs")
    cfg["data"].update({"root": str(root), "image_size": 32, "num_workers": 0, "split": {"val_fraction": 0.25}})
    cfg["train"].update({"epochs": 1, "batch_size": 3, "warmup_steps": 1})
    run = train(cfg)
    assert json.loads((run / "split.json").read_text())["mode"] == "seeded"
    s = evaluate_checkpoint(run / "best.pt", data_root=root, out=tmp_path / "ev")
    assert s["n_items"] == 8  # a whole folder; metrics at 224x224, the masks' own size
    assert len((tmp_path / "ev" / "per_case.csv").read_text().splitlines()) == 9


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "VMUNET_NO_PROGRESS": "1"})


def test_cli_bad_inputs_one_line_no_traceback(tmp_path, capsys):
    from vm_unet.training.cli import evaluate_main, run_cli, train_main

    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir(parents=True)
    (tmp_path / "bad.pt").write_bytes(b"nonsense")
    out = str(tmp_path / "r")
    cases = [
        (train_main, ["--config", "isic", "--data-root", str(tmp_path / "data"), "--out", out], "no image files"),
        (train_main, ["--config", "nosuchconfig"], "config file not found"),
        (train_main, ["--set", "train.amp=fp17", "--out", out, "--set", "data.num_samples={train: 4, val: 2}"],
         "train.amp"),
        (train_main, ["--model", "nosuchmodel", "--out", out], "nosuchmodel"),
        (evaluate_main, ["--checkpoint", str(tmp_path / "bad.pt")], "bad.pt"),
        (evaluate_main, ["--checkpoint", str(tmp_path / "none.pt")], "not found"),
    ]
    for fn, args, match in cases:
        assert run_cli(fn, args) == 2, args
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], (args, err)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
    # and as a real process: exit code 2, one line, no traceback
    r = _cli("scripts/evaluate.py", "--checkpoint", str(tmp_path / "bad.pt"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_full_disk_or_forbidden_folder_is_one_line(capsys):
    import errno

    from vm_unet.training.cli import run_cli

    def full_disk(argv):
        raise OSError(errno.ENOSPC, "No space left on device", Path("runs/x/last.pt"))
    assert run_cli(full_disk) == 2
    assert capsys.readouterr().err.strip() == "error: runs/x/last.pt: No space left on device"

    def bug(argv):   # other OS errors are not the user's to fix: the traceback stays
        raise OSError(errno.EBADF, "Bad file descriptor")
    with pytest.raises(OSError):
        run_cli(bug)


def test_cli_nan_loss_stops_clearly(tmp_path):
    # std 0 makes every input inf, so the loss is NaN on the first step
    r = _cli("scripts/train.py", "--out", str(tmp_path / "r"), "--max-steps", "2", "--image-size", "32",
             "--set", "data.std=[0,0,0]", "--set", f"model.overrides={json.dumps(TINY)}",
             "--set", "data.num_samples={train: 8, val: 4}")
    assert r.returncode == 2 and "NaN/Inf" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())  # nothing half-written


def test_volume_slices_train_and_per_volume_evaluation(tmp_path):
    from test_data import make_msd

    root = make_msd(tmp_path / "msd", n=3)
    cfg = load_config("brats_slices")
    cfg["out"] = str(tmp_path / "runs")
    cfg["model"]["overrides"] = dict(TINY)
    cfg["data"].update({"root": str(root), "image_size": 32, "split": {"val_fraction": 0.34, "seed": 0}})
    cfg["train"].update({"epochs": 1, "batch_size": 4, "warmup_steps": 1, "amp": "bf16"})  # CPU bf16 autocast
    run = train(cfg)
    s = evaluate_checkpoint(run / "best.pt", data_root=root, out=tmp_path / "ev")
    assert s["n_items"] == 3 and s["unit"].startswith("volume")  # one row per volume, scored in 3-D
    rows = (tmp_path / "ev" / "per_case.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["case0", "case1", "case2"]


def test_nan_skip_policy_logs_then_stops(tmp_path, capsys):
    from vm_unet.errors import TrainingError

    cfg = tiny_cfg(tmp_path, nan_policy="skip", epochs=12)
    cfg["data"]["std"] = [0.0, 0.0, 0.0]  # every input inf -> every loss NaN
    with pytest.raises(TrainingError, match="NaN/Inf on 11 batches"):
        train(cfg)
    assert "batch skipped" in capsys.readouterr().err


def _nan_skip_run(tmp_path, device="cpu"):
    cfg = dict(tiny_cfg(tmp_path, nan_policy="skip", epochs=1, max_steps=3), device=device)
    cfg["data"]["std"] = [0.0, 0.0, 0.0]  # every input inf -> every loss NaN
    return read_checkpoint(train(cfg) / "last.pt")["training_state"]


def test_nan_skip_leaves_the_weights_and_counts_the_step(tmp_path):
    ts = _nan_skip_run(tmp_path)
    assert ts["nan_skipped"] == 3 and ts["global_step"] == 3 and ts["scheduler"]["last_epoch"] == 3
    assert not ts["optimizer"]["state"]        # no update was ever applied


@pytest.mark.gpu
def test_gpu_nan_checked_a_step_late(tmp_path):
    """On a GPU (fused AdamW, bf16) the host reads the NaN flag a step late: the update of a bad batch is dropped on
    the device (moments and step counts untouched), the skip is counted, and the stop policy names the step."""
    from vm_unet.errors import TrainingError

    ts = _nan_skip_run(tmp_path / "skip", device="cuda")
    assert ts["nan_skipped"] == 3 and ts["global_step"] == 3 and ts["scheduler"]["last_epoch"] == 3
    state = ts["optimizer"]["state"].values()
    assert state and all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in state)
    cfg = dict(tiny_cfg(tmp_path / "stop", epochs=1), device="cuda")
    cfg["data"]["std"] = [0.0, 0.0, 0.0]
    with pytest.raises(TrainingError, match="loss became NaN/Inf at epoch 1, step 1 "):
        train(cfg)


def test_worker_error_message_reduced_to_one_line():
    from vm_unet.training.cli import one_line

    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nvm_unet.errors.DataError: /d/masks/a.png: mask is not binary')
    assert one_line(Exception(wrapped)) == "/d/masks/a.png: mask is not binary"
    assert one_line(Exception("plain message")) == "plain message"


def test_multiclass_synapse_train_and_metrics(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    (tmp_path / "syn" / "train_npz").mkdir(parents=True)
    for c in range(3):
        for s in range(4):
            lab = np.zeros((24, 24), np.float32)
            lab[3:10, 3:10], lab[14:20, 12:22] = 1, 3
            np.savez(tmp_path / "syn" / "train_npz" / f"case{c:04d}_slice{s:03d}.npz",
                     image=rng.random((24, 24), dtype=np.float32), label=lab)
    cfg = load_config("synapse")
    cfg["out"] = str(tmp_path / "runs")
    cfg["model"].update({"name": "vmunet_isic", "num_classes": 4, "overrides": dict(TINY)})
    cfg["data"].update({"root": str(tmp_path / "syn"), "image_size": 32, "class_names": ["bg", "a", "b", "c"],
                        "split": {"val_fraction": 0.34, "seed": 0}})
    cfg["train"].update({"epochs": 1, "batch_size": 4, "warmup_steps": 1})
    run = train(cfg)
    h = json.loads((run / "metrics.json").read_text())["history"][-1]
    for k in ("val_pooled_dsc_a", "val_pooled_dsc_b", "val_pooled_dsc_c", "val_mean_dice", "val_mean_hd95"):
        assert k in h, k
    # class "b" never occurs: its pooled DSC is undefined (None), not a fake 0 or 1
    assert h["val_pooled_dsc_b"] is None or h["val_pooled_dsc_b"] == 0.0
    _, meta = load_checkpoint(run / "best.pt")
    assert meta["task"] == "multiclass" and meta["class_names"] == ["bg", "a", "b", "c"]


def test_train_compile_option(tmp_path, monkeypatch):
    """``train.compile=true`` trains through torch.compile (here its aot_eager backend: the wiring, not inductor,
    is ours to test) and matches the eager run; a non-boolean value is a config error."""
    import vm_unet.training.trainer as trainer_mod
    from vm_unet.errors import ConfigError

    calls = []
    real_compile = torch.compile

    def compile_aot_eager(model, **kw):
        calls.append(type(model).__name__)
        return real_compile(model, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    eager = json.loads((train(tiny_cfg(tmp_path / "eager", epochs=1)) / "metrics.json").read_text())["history"]
    compiled = json.loads((train(tiny_cfg(tmp_path / "compiled", epochs=1, compile=True)) / "metrics.json")
                          .read_text())["history"]
    assert calls == ["VMUNet"]
    assert compiled[-1]["train_loss"] == pytest.approx(eager[-1]["train_loss"], rel=1e-4, abs=1e-5)
    with pytest.raises(ConfigError, match="train.compile"):
        trainer_mod.compile_options({"compile": "yes"}, "cuda", False)


def test_train_cuda_graphs_option_checks(tmp_path, monkeypatch):
    """``train.cuda_graphs`` is for one CUDA device: true on CPU, under DDP or a wrong value is a one-line config
    error before anything is written; auto picks."""
    import vm_unet.training.trainer as trainer_mod
    from vm_unet.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a CUDA device"):
        train(tiny_cfg(tmp_path / "cpu", epochs=1, cuda_graphs=True))
    assert not (tmp_path / "cpu").exists()
    with pytest.raises(ConfigError, match="one GPU"):
        trainer_mod.compile_options({"cuda_graphs": True}, "cuda", True)
    with pytest.raises(ConfigError, match="train.cuda_graphs must be true, false or auto"):
        trainer_mod.compile_options({"cuda_graphs": 1}, "cuda", False)
    assert trainer_mod.compile_options({"cuda_graphs": True}, "cuda", False) == (True, True)
    assert trainer_mod.compile_options({}, "cpu", False) == (False, False)
    # auto: on for one CUDA process with Triton, quietly off everywhere else
    monkeypatch.setattr("vm_unet.kernels.backend._TRITON_AVAILABLE", True)
    auto = {"cuda_graphs": "auto"}
    assert trainer_mod.compile_options(auto, "cuda", False) == (True, True)
    assert trainer_mod.compile_options(auto, "cpu", False) == (False, False)
    assert trainer_mod.compile_options(auto, "cuda", True) == (False, False)
    assert trainer_mod.compile_options({**auto, "compile": True}, "cuda", True) == (True, False)
    assert trainer_mod.compile_options({**auto, "grad_checkpointing": True}, "cuda", False) == (False, False)
    monkeypatch.setattr("vm_unet.kernels.backend._TRITON_AVAILABLE", False)
    assert trainer_mod.compile_options(auto, "cuda", False) == (False, False)
    # the long-run configs ask for auto, which a CPU run takes as off
    assert load_config("isic")["train"]["cuda_graphs"] == "auto"
    cfg = tiny_cfg(tmp_path / "auto", epochs=1, max_steps=1, cuda_graphs="auto")
    assert train(cfg).is_dir()


@pytest.mark.gpu
def test_gpu_train_cuda_graphs(tmp_path):
    """Training through CUDA graphs (the last batch shorter, so two captured shapes) gives the eager losses
    (no drop path: inductor draws its own random numbers)."""
    def run(out, **kw):
        cfg = dict(tiny_cfg(out, epochs=2, batch_size=5, amp="off", **kw), device="cuda")
        cfg["model"]["overrides"]["drop_path_rate"] = 0.0
        return json.loads((train(cfg) / "metrics.json").read_text())
    eager, graphs = run(tmp_path / "e"), run(tmp_path / "g", cuda_graphs=True)
    assert len(eager["history"]) == len(graphs["history"]) == 2
    for a, b in zip(eager["history"], graphs["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-3, abs=1e-4)


@pytest.mark.gpu
def test_gpu_resume_with_fused_adamw(tmp_path):
    """On a GPU the trainer's AdamW is the fused one, and a run stopped after epoch 1 and resumed (fused state
    restored) ends where the uninterrupted run does, to the GPU's reduction-order tolerance."""
    def cfg(out):
        c = dict(tiny_cfg(out, epochs=2, amp="off"), device="cuda")
        c["model"]["overrides"]["drop_path_rate"] = 0.0
        return c
    full = train(cfg(tmp_path / "full"))
    resumed = _stop_after_epoch_one_then_resume(cfg(tmp_path / "b"))
    groups = read_checkpoint(resumed / "last.pt")["training_state"]["optimizer"]["param_groups"]
    assert groups and all(g["fused"] for g in groups)
    ha = json.loads((full / "metrics.json").read_text())["history"]
    hb = json.loads((resumed / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in hb] == [1, 2]
    for a, b in zip(ha, hb):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3, abs=1e-5)


def test_train_grad_checkpointing_option(tmp_path):
    """``train.grad_checkpointing=true`` trains with block recomputation and matches the plain run; a
    non-boolean value is a config error before anything is written."""
    from vm_unet.errors import ConfigError

    plain = json.loads((train(tiny_cfg(tmp_path / "plain", epochs=1)) / "metrics.json").read_text())["history"]
    ckpt = json.loads((train(tiny_cfg(tmp_path / "ckpt", epochs=1, grad_checkpointing=True)) / "metrics.json")
                      .read_text())["history"]
    assert ckpt[-1]["train_loss"] == pytest.approx(plain[-1]["train_loss"], rel=1e-4, abs=1e-5)
    with pytest.raises(ConfigError, match="train.grad_checkpointing"):
        train(tiny_cfg(tmp_path / "bad", epochs=1, grad_checkpointing="yes"))
    assert not (tmp_path / "bad").exists()
