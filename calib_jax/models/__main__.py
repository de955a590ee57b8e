"""Prints the parameter-count table of the model zoo: ``python -m calib_jax.models``.

Each paper model's count is set beside the reference implementation's; the exit status is 1
when one differs, so a script (or CI) can check the zoo with it.
"""

import argparse
import sys

import jax.numpy as jnp

from calib_jax import models

REFERENCE = {("resnet50", 10): 23_520_842, ("resnet50", 100): 23_705_252,
             ("resnet110", 10): 45_864_522, ("resnet110", 100): 46_048_932,
             ("wide_resnet_26_10", 10): 36_481_434, ("wide_resnet_26_10", 100): 36_539_124,
             ("densenet121", 10): 6_956_298, ("densenet121", 100): 7_048_548,
             ("resnet50_tiny_imagenet", 200): 25_138_952}


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m calib_jax.models", allow_abbrev=False,
                            description=__doc__.splitlines()[0]).parse_args(argv)
    print("| model | classes | parameters (calib_jax) | reference | equal |")
    print("| --- | --- | --- | --- | --- |")
    differ = []
    for (name, classes), want in REFERENCE.items():
        got = models.param_count(models.get(name, classes), jnp.zeros(models.input_shape(name)))
        print(f"| {name} | {classes} | {got:,} | {want:,} | {'yes' if got == want else 'NO'} |")
        if got != want:
            differ.append(f"{name} ({classes} classes)")
    for name in ("resnet20", "resnet8"):
        got = models.param_count(models.get(name, 10), jnp.zeros(models.input_shape(name)))
        print(f"| {name} | 10 | {got:,} | (small variant) | |")
    cnn = models.get("global_pooling_cnn", 20)
    got = models.param_count(cnn, jnp.zeros((1, 1000), jnp.int32))
    print(f"| global_pooling_cnn (20k x 100 embeddings) | 20 | {got:,} | | |")
    if differ:
        print(f"parameter counts differ from the reference's: {', '.join(differ)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
