"""Training-loop throughput of a config, data loading included, without sampling or checkpoints.

    .venv/bin/python -m bench.train_step [--config configs/tiny.py] [--steps 200]

Runs train.trainer.train into a temporary directory with the config's models and data, then
prints the median samples/s over the logged intervals (the first, which follows compilation,
left out) and the final loss.
"""

import argparse
import importlib.util
import json
import statistics
import tempfile
from pathlib import Path

import jax

from ella_jax.train.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    spec = importlib.util.spec_from_file_location("bench_config", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    interval = max(args.steps // 10, 1)
    config.update(
        total_steps=args.steps, log_every=interval, checkpoint_every=10**9, sample_every=10**9
    )
    with tempfile.TemporaryDirectory() as workdir:
        train(config, workdir)
        metrics = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").open()]
    rates = [m["samples_per_s"] for m in metrics[1:]]
    print(
        f"{args.config}: batch {config.batch_size}, {config.data.resolution}px, {args.steps} steps "
        f"on {jax.device_count()} {jax.devices()[0].platform} device(s): median "
        f"{statistics.median(rates):.1f} samples/s (range {min(rates):.1f}-{max(rates):.1f}), "
        f"final loss {metrics[-1]['loss']:.4f}"
    )


if __name__ == "__main__":
    main()
