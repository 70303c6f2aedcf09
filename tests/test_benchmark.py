"""The benchmarks on CPU: a measured model row, the table, the plot, the data loader timing (speed itself is never a
test; the numbers live in BENCHMARKS.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch

from vm_unet.benchmark import Result, format_table, measure, plot_results


def test_measure_one_model_on_cpu():
    r = measure("vmunet_isic", 64, 1, torch.device("cpu"), warmup=0, repeats=1)
    assert r.note == "" and r.train_img_s > 0 and r.infer_img_s > 0
    assert r.train_peak_gb is None and r.infer_peak_gb is None       # peak memory is a CUDA statistic
    row = format_table([r]).splitlines()[-1]
    assert row.startswith("| vmunet_isic | 64² | 1 |")
    pytest.importorskip("monai")
    peer = measure("monai_unet", 64, 1, torch.device("cpu"), grad_checkpointing=True)
    assert peer.note == "no block checkpointing" and peer.train_img_s is None


def test_plot_draws_only_measured_panels(tmp_path):
    rows = [Result("a", s, 1, None, None, 100.0 / s, 1e-5 * s * s) for s in (256, 512, 1024)]
    rows.append(Result("b", 256, 1, None, None, None, None, "out of memory"))
    plot_results(rows, tmp_path / "infer.png")
    width_infer = mpimg.imread(tmp_path / "infer.png").shape[1]
    rows = [Result("a", s, 1, 10.0 / s, 2.0, 100.0 / s, 1.0) for s in (256, 512)]
    plot_results(rows, tmp_path / "all.png")
    width_all = mpimg.imread(tmp_path / "all.png").shape[1]
    assert abs(width_all / width_infer - 2) < 0.05    # four panels vs the two inference ones (tight bbox)
    plot_results([Result("c", 256, 1, None, None, None, None)], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    assert not list(tmp_path.glob(".*tmp*"))      # written atomically
    json.dumps([r.__dict__ for r in rows])         # rows serialise as the script writes them


def _load_script(name="bench_model"):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_bench_kernels_loads_another_checkouts_kernels(tmp_path):
    """``bench_kernels.py --against DIR``: another ``kernels/`` folder is imported as a package of its own, its custom
    ops renamed so both versions register in one process; a folder without the kernels is a one-line exit."""
    from pathlib import Path

    pytest.importorskip("triton")
    script = _load_script("bench_kernels")
    with pytest.raises(SystemExit, match="has no triton_ss2d.py"):
        script.load_kernels_copy(str(tmp_path))
    other = script.load_kernels_copy(str(Path(__file__).resolve().parents[1] / "kernels"))
    assert other.__name__ == "vm_unet_kernels_against.triton_ss2d"
    assert other.ss2d_core_packed_triton is not script.ss2d_fused
    assert script.fused_entry(other) is other.ss2d_core_packed_triton
    assert hasattr(torch.ops.vm_unet_against, "ss2d_fwd") and hasattr(torch.ops.vm_unet, "ss2d_fwd")


def test_bench_kernels_against_gpu_time_rows(monkeypatch):
    """``--against DIR --gpu-time``: the A/B's bookkeeping (both versions alternated, medians, the scan kernels'
    shares) on stand-in ops; on a machine without CUDA the profiler records no device time, so every time is 0."""
    pytest.importorskip("triton")
    script = _load_script("bench_kernels")
    monkeypatch.setattr(script, "make_inputs", lambda *a, requires_grad=False: [
        torch.randn(2, 3, requires_grad=requires_grad)])
    monkeypatch.setattr(script, "ss2d_fused", lambda x: x * 2.0)
    other = type("Other", (), {"ss2d_core_packed_triton": staticmethod(lambda x: x * 3.0)})
    rows = script.against(other, ["s4-256"], states=(16,), reps=2, gpu_time=True)
    assert [(r["shape"], r["N"], r["dtype"]) for r in rows] == [("s4-256", 16, "float32"), ("s4-256", 16, "bfloat16")]
    for r in rows:
        for tag in ("other", "this"):
            for key in ("fwd_ms", "fwdbwd_ms", "bwd_kernel_ms", "fwd_kernels_ms"):
                assert r[f"{tag}_{key}"] >= 0.0


def test_bench_kernels_sweep_tiles_parse():
    """``--sweep-tiles`` adds tiles per kernel; a malformed spec is a one-line exit, not a traceback."""
    pytest.importorskip("triton")
    script = _load_script("bench_kernels")
    assert script.parse_tiles("fwd=16,8,1;bwd=8,4,2;fwd=8,16,1") == {"fwd": [(16, 8, 1), (8, 16, 1)],
                                                                    "bwd": [(8, 4, 2)]}
    assert script.parse_tiles(None) == {}
    with pytest.raises(SystemExit, match="expected fwd=BD,BL,WARPS"):
        script.parse_tiles("states=8,4,1")


def test_bench_kernels_main_table_marks_missing_timings():
    """The main table: a row without the reference or the mamba anchor shows dashes, not nan; the ratios are the
    anchor's time over ours."""
    pytest.importorskip("triton")
    script = _load_script("bench_kernels")
    row = {"shape": "s1-256", "batch": 32, "N": 16, "dtype": "float32", "fused_fwd_ms": 1.0, "fused_fwd_GBs": 281.4,
           "fused_fwd_pct_copy": 7.2, "fused_fwdbwd_ms": 5.0}
    full = dict(row, unfused_fwd_ms=3.9, unfused_fwdbwd_ms=17.5, mamba_anchor_fwd_ms=4.47, mamba_anchor_fwdbwd_ms=14.69)
    lines = script.main_table([row, full]).splitlines()
    assert len(lines) == 4 and "nan" not in "\n".join(lines)
    assert lines[2].endswith("| 5.000 | – | – | – | – |")
    assert lines[3].endswith("| 3.900 | 17.500 | 4.470 (4.47x) | 14.690 (2.94x) |")


def test_bench_model_refuses_cuda_graphs_on_cpu(capsys):
    script = _load_script()
    assert script.main(["--device", "cpu", "--cuda-graphs", "--models", "vmunet_isic", "--sizes", "64"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --cuda-graphs needs --device cuda"


def test_bench_model_rejects_an_unknown_model_in_one_line(tmp_path, capsys):
    script = _load_script()
    assert script.main(["--device", "cpu", "--models", "vmunet_isic", "smp_unet", "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'smp_unet'") and "smp_unet_r34" in err and "\n" not in err
    assert not list(tmp_path.iterdir())   # refused before measuring anything


def test_bench_model_saves_each_row_as_it_goes(tmp_path, monkeypatch):
    """With ``--out`` the JSON holds every row measured so far (a run cut short keeps them), with the versions that
    measured them; the plot comes at the end."""
    script = _load_script()
    out = tmp_path / "run.json"
    on_disk = []
    real = script.measure

    def measure(name, *args, **kwargs):
        on_disk.append([r["model"] for r in json.loads(out.read_text())["results"]] if out.exists() else [])
        return real(name, *args, **kwargs)

    monkeypatch.setattr(script, "measure", measure)
    argv = ["--device", "cpu", "--models", "vmunet_isic", "vmunet_fast", "--sizes", "32", "--no-train",
            "--warmup", "0", "--repeats", "1", "--out", str(out)]
    assert script.main(argv) == 0
    assert on_disk == [[], ["vmunet_isic"]]
    saved = json.loads(out.read_text())
    assert [r["model"] for r in saved["results"]] == ["vmunet_isic", "vmunet_fast"]
    assert f"torch {torch.__version__}" in saved["device"] and out.with_suffix(".png").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_bench_model_replot(tmp_path, capsys):
    """``--replot`` redraws a saved run (the committed plots under docs/benchmarks come from it); a file that is
    not a results JSON is a one-line error."""
    from dataclasses import asdict

    script = _load_script()
    rows = [Result("a", s, 1, None, None, 100.0 / s, 1e-5 * s * s) for s in (256, 512)]
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"device": "GPU x", "date": "2026-11-21", "results": [asdict(r) for r in rows]}))
    assert script.main(["--replot", str(saved)]) == 0
    assert mpimg.imread(tmp_path / "run.png").shape[0] > 100 and "| a | 512² |" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    assert script.main(["--replot", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and not (tmp_path / "bad.png").exists()


def test_committed_benchmark_results_load():
    from pathlib import Path

    from vm_unet.benchmark import load_results

    files = sorted((Path(__file__).resolve().parents[1] / "docs" / "benchmarks").glob("*.json"))
    assert files
    for f in files:
        info, rows = load_results(f)
        assert info["device"] and info["date"] and info["source"] and rows, f
        assert f.with_suffix(".png").exists(), f


def test_bench_data_times_the_training_loader(tmp_path, monkeypatch, capsys):
    """``scripts/bench_data.py`` runs the trainer's loader: epoch 1 stores the resized copies, epoch 2 reads them;
    a bad data folder is a one-line error."""
    from test_data import make_pairs

    repo = Path(__file__).resolve().parents[1]
    root = make_pairs(tmp_path / "d", n=10, size=(90, 70))
    cmd = [sys.executable, str(repo / "scripts" / "bench_data.py"), "--config", "isic", "--data-root", str(root),
           "--device", "cpu", "--epochs", "2", "--batch-size", "4", "--image-size", "32"]
    r = subprocess.run(cmd + ["--set", "data.num_workers=1"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "VMUNET_NO_PROGRESS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 2 and "(0 of 8 stored before)" in lines[0] and "(8 of 8 stored before)" in lines[1], r.stdout
    bad = subprocess.run(cmd[:5] + [str(tmp_path / "missing")] + cmd[6:], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
