"""Regenerates experiments/paper_numbers.json from shared/docs/paper.md (a one-off dev tool).

Usage: python experiments/extract_paper_numbers.py ../shared/docs/paper.md
"""

import json
import re
import sys
from pathlib import Path

from calib_jax.files import atomic_write_text

LOSS = {"CE": "ce", "Brier": "brier", "MMCE": "mmce_weighted", "LS-0.05": "label_smoothing",
        "FL-3": "focal", "FLSD-53": "flsd53"}
DATASET = {"CIFAR-10": "cifar10", "CIFAR-100": "cifar100", "Tiny-ImageNet": "tiny_imagenet",
           "20 Newsgroups": "20news", "SVHN": "svhn", "CIFAR-10-C": "cifar10_c"}
MODEL = {"ResNet-50": "resnet50", "ResNet-110": "resnet110",
         "Wide-ResNet-26-10": "wide_resnet_26_10", "DenseNet-121": "densenet121",
         "Global-pooling CNN": "global_pooling_cnn"}


def tables(text):
    blocks, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            if not set(line) <= set("|- "):
                current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            blocks.append(current)
            current = []
    return blocks + ([current] if current else [])


def loss_cells(table, dataset=None):
    """(dataset, model, loss, paper column name, row cells) for every loss column of a table."""
    header = table[0]
    for row in table[1:]:
        cells = dict(zip(header, row))
        ds = DATASET[cells["Dataset"]] if "Dataset" in cells else dataset
        model = "resnet50_tiny_imagenet" if ds == "tiny_imagenet" else MODEL[cells["Model"]]
        for name, loss in LOSS.items():
            if name in cells:
                yield ds, model, loss, name, cells


def ece_rows(table, dataset=None):
    out = []
    for ds, model, loss, name, cells in loss_cells(table, dataset):
        m = re.match(r"([\d.]+) \(([\d.]+)\)", cells[f"{name} (T)"])
        out.append({"dataset": ds, "model": model, "loss": loss, "ece": float(cells[name]),
                    "ece_t": float(m.group(1)), "temperature": float(m.group(2))})
    return out


def error_rows(table, dataset=None):
    return [{"dataset": ds, "model": model, "loss": loss, "error": float(cells[name])}
            for ds, model, loss, name, cells in loss_cells(table, dataset)]


def ood_rows(table):
    header, out = table[0], []
    for row in table[1:]:
        cells = dict(zip(header, row))
        for name, loss in LOSS.items():
            out.append({"dataset": "cifar10", "ood": DATASET[cells["OOD set"]],
                        "model": MODEL[cells["Model"]], "loss": loss,
                        "auroc_entropy": float(cells[name]),
                        "auroc_entropy_t": float(cells[f"{name} (T)"])})
    return out


def main(path):
    t = tables(Path(path).read_text())
    data = {
        "source": "shared/docs/paper.md (Mukhoti et al. 2020; [README]/[ADAFOCAL] tables); "
                  "percent; temperatures chosen by validation ECE",
        "ece": ece_rows(t[0], "cifar10") + ece_rows(t[1]),
        "error": error_rows(t[2], "cifar10") + error_rows(t[3]),
        "ood_auroc": ood_rows(t[4]),
    }
    out = Path(__file__).with_name("paper_numbers.json")
    atomic_write_text(out, json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}: {len(data['ece'])} ECE cells, {len(data['error'])} error cells, "
          f"{len(data['ood_auroc'])} OOD cells")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/docs/paper.md")
