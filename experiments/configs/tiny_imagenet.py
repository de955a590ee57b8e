"""The reference recipe for Tiny-ImageNet (``train_scripts/tinyImageNet.sh``).

ResNet-50 with 64x64 inputs, 100 epochs, lr 0.1 x0.1 at epochs 40 and 60
(Brier: lr 0.035), batch 64, other settings as CIFAR. The reference tunes T
on the official val split, which is also its test set (flagged in results).
Data: unzip http://cs231n.stanford.edu/tiny-imagenet-200.zip into the data directory
(``<data_dir>/tiny-imagenet-200/``, read as it comes); the offline copy holds the val split only.
Usage: ``--config experiments/configs/tiny_imagenet.py:loss=flsd53``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import cifar10  # noqa: E402


def get_config(arg=None):
    c = cifar10.base_config()
    c.dataset = "tiny_imagenet"
    c.model = "resnet50_tiny_imagenet"
    c.num_epochs = 100
    c.lr_boundaries = (40, 60)
    c.batch_size = 64
    c.eval_batch_size = 64
    c = cifar10.parse_overrides(c, arg)
    if c.loss == "brier" and (not arg or "learning_rate=" not in arg):
        c.learning_rate = 0.035
    return c
