"""Images/s of the training input path: on-device gather + random crop + flip (+ normalise).

Usage: python benchmarks/input_pipeline_bench.py [--batch-sizes 128,1024] [--steps 50]

Uses the CIFAR-10 training split if it is found locally, else random uint8
images of the same shape. Prints a table; the first call's compile time is
reported separately.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from calib_jax.data import datasets, pipeline


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--batch-sizes", default="128,1024")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    try:
        train = datasets.load("cifar10", "train")
        images, labels, what = train.inputs, train.labels, f"CIFAR-10 train ({train.source})"
    except datasets.DataNotFoundError:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (45000, 32, 32, 3), np.uint8)
        labels = rng.integers(0, 10, 45000)
        what = "random uint8 45000x32x32x3"
    mean, std = datasets.normalization("cifar10", "train")
    x_dev, y_dev = pipeline.put_on_device(images, labels)
    order = pipeline.epoch_order(0, 0, len(labels))
    to_float = jax.jit(lambda x: pipeline.normalize(x, mean, std, jnp.bfloat16))
    print(f"data: {what}; jax {jax.__version__} on {jax.devices()[0].platform} "
          f"({jax.device_count()} device(s))")
    print("| batch | img/s (crop+flip, uint8) | img/s (+ normalise to bf16) | compile (s) |")
    print("| --- | --- | --- | --- |")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        steps = min(args.steps, pipeline.steps_per_epoch(len(labels), bs))
        start = time.perf_counter()
        jax.block_until_ready(to_float(pipeline.train_batch(x_dev, y_dev, order, 0, seed=0,
                                                            epoch=0, batch_size=bs)[0]))
        compile_s = time.perf_counter() - start
        rates = []
        for normalise in (False, True):
            start = time.perf_counter()
            for step in range(steps):
                x, y = pipeline.train_batch(x_dev, y_dev, order, step, seed=0, epoch=0,
                                            batch_size=bs)
                if normalise:
                    x = to_float(x)
                jax.block_until_ready(x)
            rates.append(steps * bs / (time.perf_counter() - start))
        print(f"| {bs} | {rates[0]:,.0f} | {rates[1]:,.0f} | {compile_s:.2f} |")


if __name__ == "__main__":
    main()
