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

A bracketed loss list trains a row's cells as one vmapped program, each cell
in ``<workdir>/<loss>`` (``calib_jax.train.run_members``):
``cell=cifar10/resnet50/[ce,brier,mmce_weighted,label_smoothing,focal,flsd53]``.
Cells with an exception recipe cannot join their row's program (an error says
which groups to train); :func:`row_groups` splits a row accordingly.
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


def cell_config(dataset, model, loss):
    """The reference recipe of one cell, with the reference scripts' exceptions."""
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
    return c


def row_groups(dataset, model, losses):
    """Losses of one table row that share a recipe (all but the loss), in order: each
    group can train as one vmapped program; the exceptions above form their own group."""
    groups = []
    for loss in losses:
        recipe = cell_config(dataset, model, loss)
        recipe.loss = "ce"
        for group in groups:
            if group[0] == recipe.to_json():
                group[1].append(loss)
                break
        else:
            groups.append((recipe.to_json(), [loss]))
    return [names for _, names in groups]


def get_config(arg=None):
    if not arg or not arg.startswith("cell="):
        raise ValueError("paper.py needs cell=<dataset>/<model>/<loss>, e.g. "
                         "cell=cifar10/resnet50/flsd53, or a row's losses trained as one "
                         "program: cell=cifar10/resnet50/[ce,brier,focal,flsd53]")
    cell, *rest = cifar10.split_overrides(arg)
    dataset, model, loss = cell[len("cell="):].split("/", 2)
    losses = [t.strip() for t in loss.strip("[]").split(",") if t.strip()]
    groups = row_groups(dataset, model, losses)
    if len(groups) > 1:
        raise ValueError(f"cell={dataset}/{model}/{loss}: these losses use different recipes "
                         f"(the reference's exceptions), so they cannot share one program; "
                         f"train these groups separately: {groups}")
    c = cell_config(dataset, model, losses[0])
    if len(losses) > 1:
        c.loss = "[" + ",".join(losses) + "]"
    return cifar10.parse_overrides(c, ",".join(rest))
