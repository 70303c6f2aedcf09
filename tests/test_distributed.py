"""DDP pieces on CPU with gloo and 2 processes: metric reduction equals the single-process result, and train
sampler shards cover the epoch without overlap."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vm_unet.training.metrics import SegMetrics
from vm_unet.training.sampling import ShardSampler, TrainSampler


def _data():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 2, (5, 16, 16), generator=g)
    tgt = torch.randint(0, 2, (5, 16, 16), generator=g)
    return pred, tgt, [f"img{i}" for i in range(5)]


def _worker(rank, world, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pred, tgt, names = _data()
        m = SegMetrics(1, ["bg", "fg"], hd95=True)
        idx = list(ShardSampler(5, rank, world))  # uneven shards: 3 + 2 items
        m.update(pred[idx], tgt[idx], [names[i] for i in idx])
        m.reduce()
        # by value (numpy): a tensor would be shared through a file descriptor that dies with this process, a race
        # with the parent's read (seen as "Connection reset by peer")
        q.put((rank, m.summary(), m.conf.numpy().copy()))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_metrics_reduce_across_two_gloo_ranks():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = [q.get(timeout=100) for _ in range(2)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    pred, tgt, names = _data()
    ref = SegMetrics(1, ["bg", "fg"], hd95=True)
    ref.update(pred, tgt, names)
    want = ref.summary()
    for _, summ, conf in res:
        conf = torch.from_numpy(conf)
        assert torch.equal(conf, ref.conf)
        assert summ["n_items"] == 5
        for k, v in want.items():
            assert summ[k] == pytest.approx(v, nan_ok=True), k


def test_train_sampler_shards_partition_epoch():
    shards = []
    for r in range(3):
        s = TrainSampler(10, seed=1, rank=r, world=3)
        s.set_epoch(2)
        shards.append([i for i, _ in s])
    assert len({len(x) for x in shards}) == 1  # equal batches per rank, or DDP would hang
    flat = sum(shards, [])
    assert set(flat) == set(range(10)) and len(flat) == 12  # padded by 2 repeats, like DistributedSampler


@pytest.mark.timeout(240)
def test_torchrun_two_cpu_processes_end_to_end(tmp_path):
    """Real torchrun + gloo run: rank 0 writes one run folder, and the validation Dice it logged (reduced over
    both ranks' shards) equals a single-process evaluation of the saved checkpoint."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from vm_unet.checkpoint import read_checkpoint
    from vm_unet.training.evaluate import evaluate_checkpoint

    repo = Path(__file__).resolve().parents[1]
    tiny = "{dims: [8,16,32,64], depths: [1,1,1,1], depths_decoder: [1,1,1,1], d_state: 2}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "scripts/train.py",
           "--out", str(tmp_path), "--device", "cpu", "--image-size", "32", "--epochs", "1", "--batch-size", "4",
           "--set", f"model.overrides={tiny}", "--set", "data.num_samples={train: 8, val: 5}"]
    env = {**os.environ, "VMUNET_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=220, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = list(tmp_path.iterdir())
    ts = read_checkpoint(run / "last.pt")["training_state"]
    assert len(ts["rng"]) == 2 and ts["global_step"] == 1  # 8 samples / 2 ranks / batch 4
    logged = json.loads((run / "metrics.json").read_text())["history"][-1]
    assert logged["val_n_items"] == 5  # uneven shards (3 + 2), each item counted once
    s = evaluate_checkpoint(run / "best.pt", out=tmp_path / "ev")
    assert abs(s["mean_dice"] - logged["val_mean_dice"]) < 1e-6
    assert abs(s["pooled_dsc"] - logged["val_pooled_dsc"]) < 1e-6
