"""Validation metrics and the trainer's background writes: HD95 against MONAI's metric class, the same numbers from
worker processes as in-process, and the writer's order and error handling."""
import math
import threading
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import HausdorffDistanceMetric

from vm_unet.training.background import BackgroundWriter
from vm_unet.training.metrics import SegMetrics, hd95_batch, hd95_pool, one_hot


def _blobs(n_items, size, classes, seed):
    """(n, size, size) label maps: a few random discs per item, some items left empty."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n_items, size, size), np.int64)
    for i in range(n_items):
        for _ in range(int(g.integers(0, 3))):
            cx, cy, r = g.integers(0, size, 2).tolist() + [int(g.integers(2, size // 3))]
            out[i][(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = int(g.integers(1, classes))
    return torch.from_numpy(out)


@pytest.mark.parametrize("classes", [2, 4])
def test_hd95_batch_is_monais_metric(classes):
    pred, target = _blobs(7, 33, classes, 0), _blobs(7, 33, classes, 1)
    pred[0], target[0] = target[0], target[0]   # identical: HD95 0 where not empty
    got = hd95_batch(pred.numpy().astype(np.uint8), target.numpy().astype(np.uint8), classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
            one_hot(pred, classes), one_hot(target, classes)).double().numpy()
    assert got.shape == (7, classes - 1)
    for b in range(7):
        for c in range(1, classes):
            empty = not (pred[b] == c).any() or not (target[b] == c).any()
            if empty:   # undefined: NaN (MONAI gives inf or NaN)
                assert math.isnan(got[b, c - 1])
            else:
                assert got[b, c - 1] == pytest.approx(want[b, c - 1])
    assert np.isfinite(got).any() and np.isnan(got).any()   # the data exercises both cases


@pytest.mark.timeout(180)
def test_hd95_in_worker_processes_matches_in_process():
    names = ["background", "a", "b"]
    pool = hd95_pool(2)
    try:
        local, pooled = SegMetrics(3, names), SegMetrics(3, names, pool=pool)
        for m in (local, pooled):
            m.reset()
            for k in range(3):   # several batches: rows are filled in batch by batch
                pred, target = _blobs(4, 24, 3, 10 + k), _blobs(4, 24, 3, 20 + k)
                m.update(pred, target, [f"img{k}_{i}" for i in range(4)])
        assert len(pooled.pending) == 3
        want, got = local.summary(), pooled.summary()
        assert not pooled.pending
        for r_local, r_pooled in zip(local.rows, pooled.rows):
            assert r_local.keys() == r_pooled.keys()
            for key, v in r_local.items():
                assert r_pooled[key] == pytest.approx(v, nan_ok=True) if isinstance(v, float) else r_pooled[key] == v
        for key, v in want.items():
            assert got[key] == pytest.approx(v, nan_ok=True), key
        assert math.isfinite(got["mean_hd95"])
    finally:
        pool.shutdown()


@pytest.mark.timeout(120)
def test_a_dead_hd95_worker_falls_back_to_the_training_process():
    import os

    pool = hd95_pool(1)
    try:
        local, pooled = SegMetrics(1, ["bg", "fg"]), SegMetrics(1, ["bg", "fg"], pool=pool)
        pred, target = _blobs(4, 24, 2, 3), _blobs(4, 24, 2, 4)
        local.update(pred, target, list("abcd"))
        pooled.update(pred, target, list("abcd"))   # queued behind the job below, or refused: the pool breaks
        pool.submit(os._exit, 1)   # the worker dies (as if killed for memory)
        with pytest.warns(UserWarning, match="HD95 worker process died"):
            pooled.update(pred, target, list("efgh"))
            got = pooled.summary()
        local.update(pred, target, list("efgh"))
        assert pooled.pool is None and got == pytest.approx(local.summary(), nan_ok=True)
    finally:
        pool.shutdown()


def test_no_pool_without_workers():
    assert hd95_pool(0) is None


def test_background_writer_runs_in_order_and_reports_failures():
    writer = BackgroundWriter()
    done, gate = [], threading.Event()
    writer.submit(gate.wait)   # holds the queue until the jobs below are queued
    for i in range(5):
        writer.submit(done.append, i)
    assert done == []   # queued, not run: submit does not wait
    gate.set()
    writer.wait()
    assert done == [0, 1, 2, 3, 4]

    def fail():
        raise OSError("No space left on device")
    writer.submit(fail)
    writer.submit(done.append, 5)   # after a failure nothing more is written
    with pytest.raises(OSError, match="No space"):
        writer.wait()
    with pytest.raises(OSError, match="No space"):   # and every later call says so
        writer.submit(done.append, 6)
    assert done == [0, 1, 2, 3, 4]
