"""Prints the parameter-count table of the model zoo: ``python -m calib_jax.models``."""

import jax.numpy as jnp

from calib_jax import models

REFERENCE = {("resnet50", 10): 23_520_842, ("resnet50", 100): 23_705_252,
             ("resnet110", 10): 45_864_522, ("resnet110", 100): 46_048_932,
             ("wide_resnet_26_10", 10): 36_481_434, ("wide_resnet_26_10", 100): 36_539_124,
             ("densenet121", 10): 6_956_298, ("densenet121", 100): 7_048_548,
             ("resnet50_tiny_imagenet", 200): 25_138_952}


def main():
    print("| model | classes | parameters (calib_jax) | reference | equal |")
    print("| --- | --- | --- | --- | --- |")
    for (name, classes), want in REFERENCE.items():
        got = models.param_count(models.get(name, classes), jnp.zeros(models.input_shape(name)))
        print(f"| {name} | {classes} | {got:,} | {want:,} | {'yes' if got == want else 'NO'} |")
    for name in ("resnet20", "resnet8"):
        got = models.param_count(models.get(name, 10), jnp.zeros(models.input_shape(name)))
        print(f"| {name} | 10 | {got:,} | (small variant) | |")
    cnn = models.get("global_pooling_cnn", 20)
    got = models.param_count(cnn, jnp.zeros((1, 1000), jnp.int32))
    print(f"| global_pooling_cnn (20k x 100 embeddings) | 20 | {got:,} | | |")


if __name__ == "__main__":
    main()
