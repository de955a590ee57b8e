"""calib_jax: calibration-aware training in JAX.

Modules:
  losses       -- focal loss, FLSD, scheduled gamma, CE, Brier, MMCE, label smoothing.
  metrics      -- ECE, MCE, AdaECE, classwise ECE, NLL, accuracy, Brier; streaming stats.
  calibration  -- temperature grid search (one compiled call) and continuous NLL fit.
  bootstrap    -- confidence intervals of any metric over resamples of the test set.
  ood          -- entropy / confidence scores, AUROC and ROC curves.
  validation   -- the input checks every function runs.
"""

from calib_jax import bootstrap, calibration, losses, metrics, ood, validation

__version__ = "0.1.0"

__all__ = ["bootstrap", "calibration", "losses", "metrics", "ood", "validation", "__version__"]
