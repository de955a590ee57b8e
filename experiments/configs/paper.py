"""One config per cell of the paper's tables: ``cell=<dataset>/<model>/<loss>``.

Covers every row: CIFAR-10/100, Tiny-ImageNet, 20 Newsgroups and SST.

``--config experiments/configs/paper.py:cell=cifar10/wide_resnet_26_10/brier`` gives the
reference recipe for that cell, with the reference scripts' exceptions:

* Wide-ResNet-26-10, CIFAR-10, Brier: 550 epochs;
* ResNet-110, CIFAR-100, Brier: 430 epochs;
* Tiny-ImageNet, Brier: lr 0.035.

Losses use the paper's names mapped to ours: CE ``ce``, Brier ``brier``, MMCE
``mmce_weighted`` (lambda 2), LS-0.05 ``label_smoothing``, FL-3 ``focal``
(gamma 3), FLSD-53 ``flsd53``; FLSD-52 ``flsd52`` and FLSc-531 ``flsc531`` too.
Further ``key=value`` pairs after the cell override fields, e.g.
``cell=cifar10/resnet50/ce,num_epochs=1``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import cifar10  # noqa: E402
import news20  # noqa: E402
import sst  # noqa: E402
import tiny_imagenet  # noqa: E402

DATASETS = ("cifar10", "cifar100", "tiny_imagenet")
CIFAR_MODELS = ("resnet50", "resnet110", "wide_resnet_26_10", "densenet121")
PAPER_LOSSES = ("ce", "brier", "mmce_weighted", "label_smoothing", "focal", "flsd53")


def cells():
    """Every image cell of the paper's tables, as (dataset, model, loss)."""
    out = [(d, m, l) for d in ("cifar10", "cifar100") for m in CIFAR_MODELS for l in PAPER_LOSSES]
    out += [("tiny_imagenet", "resnet50_tiny_imagenet", l) for l in PAPER_LOSSES]
    out += [("20news", "global_pooling_cnn", l) for l in PAPER_LOSSES]
    out += [("sst", "tree_lstm", l) for l in PAPER_LOSSES]
    return out


def get_config(arg=None):
    if not arg or not arg.startswith("cell="):
        raise ValueError("paper.py needs cell=<dataset>/<model>/<loss>, e.g. "
                         "cell=cifar10/resnet50/flsd53")
    cell, _, rest = arg.partition(",")
    dataset, model, loss = cell[len("cell="):].split("/")
    if dataset == "tiny_imagenet":
        c = tiny_imagenet.get_config(f"loss={loss}")
    elif dataset == "20news":
        c = news20.get_config(f"loss={loss}")
    elif dataset == "sst":
        c = sst.get_config(f"loss={loss}")
    else:
        c = cifar10.get_config(f"dataset={dataset},model={model},loss={loss}")
    if dataset == "cifar10" and model == "wide_resnet_26_10" and loss == "brier":
        c.num_epochs = 550
    if dataset == "cifar100" and model == "resnet110" and loss == "brier":
        c.num_epochs = 430
    return cifar10.parse_overrides(c, rest)
