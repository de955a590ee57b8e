"""Loads the config files of experiments/configs/ for the tests (they are scripts, not a package)."""

import importlib
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments" / "configs"

#: A two-epoch run of ResNet-8 on the generated task: the tests' standard tiny run.
TINY_RUN = ("dataset=synthetic,model=resnet8,num_epochs=2,batch_size=64,checkpoint_every_epochs=1,"
            "eval_batch_size=128")


def load(module: str, arg: str | None = None):
    """``experiments/configs/<module>.py``'s ``get_config(arg)``."""
    sys.path.insert(0, str(CONFIG_DIR))
    try:
        return importlib.import_module(module).get_config(arg)
    finally:
        sys.path.pop(0)
