"""Data sets by name (:mod:`.datasets`), their sources (:mod:`.sources`) and the
on-device training input pipeline (:mod:`.pipeline`)."""

from calib_jax.data import datasets, pipeline, sources
from calib_jax.data.datasets import Dataset, load, names, normalization, word_vectors
from calib_jax.data.sources import DamagedDataError, DataNotFoundError

__all__ = ["DamagedDataError", "DataNotFoundError", "Dataset", "datasets", "load", "names",
           "normalization", "pipeline", "sources", "word_vectors"]
