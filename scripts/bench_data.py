#!/usr/bin/env python
"""Training data pipeline throughput (images a second per epoch, no model): does it keep up with the GPU?

Takes the training command's options. Compare its img/s with ``bench_model.py``'s training img/s for the same model,
size and batch; a loader below it leaves the GPU waiting (raise data.num_workers).

    python scripts/bench_data.py --config isic --data-root /data/ISIC2018 --epochs 2 --set data.num_workers=8
    python scripts/bench_data.py --config isic --data-root /data/ISIC2018 --set data.cache=false --max-samples 512
"""
import sys

from vm_unet.benchmark import measure_loader
from vm_unet.training.cli import config_from_args, run_cli, train_parser


def main(argv=None):
    p = train_parser()
    p.prog, p.description = "bench_data.py", __doc__.splitlines()[0]
    p.add_argument("--max-samples", type=int, help="time the first N training samples only")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    data = cfg["data"]
    print(f"{data.get('kind')} {data.get('root') or ''}: batch {cfg['train']['batch_size']}, "
          f"{data.get('num_workers', 0)} workers, image size {data.get('image_size')}, "
          f"cache {'on' if data.get('cache', True) else 'off'}", flush=True)
    for r in measure_loader(cfg, int(cfg["train"]["epochs"]), args.max_samples):
        stored = "" if r["stored_before"] is None else f"  ({r['stored_before']} of {r['samples']} stored before)"
        print(f"epoch {r['epoch']}: {r['samples']} samples in {r['seconds']:.1f} s, {r['img_s']:.1f} img/s{stored}",
              flush=True)


if __name__ == "__main__":
    sys.exit(run_cli(main))
