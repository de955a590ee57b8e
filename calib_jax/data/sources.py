"""Where data sets come from: local chunk files, image folders, or TFDS.

Resolution of the data directory (the first that holds the data set's folder wins):

1. the ``data_dir`` argument;
2. the ``CALIB_JAX_DATA_DIR`` environment variable;
3. ``../shared/data`` next to the repository (the project's offline copies).

A ``data_dir`` argument that is not a directory is refused (``DataNotFoundError``) rather than
skipped: a misspelt path would otherwise load the same-named data set from a later place (e.g.
the JPEG-compressed offline CIFAR-10 copy instead of one's own), with nothing but
``Dataset.source`` to tell. One that exists but lacks a data set's folder falls through to the
next place (a directory holding CIFAR-10 only still finds an OOD set elsewhere). A file that
is there but cannot be read raises ``DamagedDataError`` naming it, and the search stops: it
does not fall through to a later place either.

A local data set lives in ``<data_dir>/<folder>/`` as either

* **chunks**: ``*.npz`` files holding ``blob`` (concatenated JPEG/PNG bytes),
  ``offsets`` (``n + 1`` int64), ``labels`` and ``names``; a file's split is
  the part of its name before the trailing ``_NNN`` (``cifar10_train_003.npz``
  is split ``train``; a split's chunks under two names are refused); or
* **an image tree**: ``<folder>/<split>/<class name>/*.{png,jpg,jpeg}``, class
  indices in sorted class-name order; or
* **the Tiny-ImageNet release** (``tiny-imagenet-200.zip`` unzipped, marked by its
  ``wnids.txt``): ``train/<wnid>/images/*.JPEG``, and ``val/images/*.JPEG`` labelled by
  ``val/val_annotations.txt``; class indices in sorted wnid order, as the reference numbers
  them (``Data/tiny_imagenet.py``). Its unlabelled ``test/`` split is not read; or
* **the CIFAR "python version" releases** (``cifar-10-python.tar.gz`` /
  ``cifar-100-python.tar.gz`` extracted: what torchvision downloads and the reference reads),
  marked by ``batches.meta`` (CIFAR-10: ``data_batch_1`` ... ``data_batch_5``, ``test_batch``)
  or ``meta`` (CIFAR-100: ``train``, ``test``; the 100 fine labels): pickled batches, read
  with an unpickler that builds NumPy arrays, lists and numbers only (a pickle can otherwise
  run code). In the original order, so the reference's split indices select the reference's
  validation images; or
* **SVHN's release** (``test_32x32.mat``, what torchvision downloads): a MATLAB file read
  with SciPy (a JAX dependency); the label 10 of digit 0 becomes 0, as in TFDS and torchvision.

A split's chunks win over the other layouts in the same folder, and a release's marker file
(``wnids.txt``, ``batches.meta``, ``meta``, ``<split>_32x32.mat``) over a plain tree.

TFDS (``source="tfds"``) reads a prepared data set through
``tfds.data_source`` (array_record files), which does not need TensorFlow. TFDS stores the
examples shuffled by a hash of their keys; CIFAR-10's and CIFAR-100's are put back in the
original files' order, which their ``id`` gives (``train_00042``).
Preparing it the first time (``tfds.builder(name).download_and_prepare()``)
does need TensorFlow and network: ``pip install 'calib_jax[tfds]' tensorflow``.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import io
import logging
import os
import pickle
import re
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

ENV_DATA_DIR = "CALIB_JAX_DATA_DIR"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataNotFoundError(FileNotFoundError):
    """A data set is not where we looked; the message says what to fetch and where."""


class DamagedDataError(ValueError):
    """A data file is there but cannot be read (truncated, corrupted, or not the format); the
    message names the file. Deliberately not a :class:`DataNotFoundError`: the search stops
    here instead of falling through to the next source (TFDS, another directory), which would
    silently train or evaluate on other data than the user's."""


def damaged_file(where: str, error: Exception, *, verb: str = "cannot be read") -> DamagedDataError:
    """The :class:`DamagedDataError` for ``where`` (a file, an image, a line), with the error
    that reading it raised."""
    return DamagedDataError(f"{where} {verb} ({type(error).__name__}: {error}); copy or "
                            f"download it again.")


def candidate_data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched, in order (see the module docstring); a ``data_dir`` that is not
    a directory raises :class:`DataNotFoundError`."""
    dirs = []
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise DataNotFoundError(
                f"`data_dir` = {data_dir}: no such directory. Give the directory that holds the "
                f"data sets' folders (e.g. <data_dir>/cifar10/), or None to search "
                f"${ENV_DATA_DIR}, then {Path(__file__).resolve().parents[3] / 'shared' / 'data'}"
                f", then TFDS.")
        dirs.append(Path(data_dir))
    if os.environ.get(ENV_DATA_DIR):
        dirs.append(Path(os.environ[ENV_DATA_DIR]))
    dirs.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    return dirs


def find_folder(folder: str | tuple[str, ...], data_dir=None) -> Path | None:
    """The first ``<dir>/<folder>`` that exists among :func:`candidate_data_dirs`; ``folder``
    may be several names, tried in order in each directory (e.g. ours and a release's own:
    ``("tinyimagenet", "tiny-imagenet-200")``)."""
    names = (folder,) if isinstance(folder, str) else tuple(folder)
    for d in candidate_data_dirs(data_dir):
        for name in names:
            if (d / name).is_dir():
                return d / name
    return None


def decode_images(blobs: Iterable[bytes], names=None) -> np.ndarray:
    """Decodes encoded images (JPEG, PNG) into one uint8 ``[N, H, W, 3]`` array. An image that
    cannot be decoded raises :class:`DamagedDataError` naming it (``names[i]``, else its
    index)."""
    from PIL import Image  # Pillow: a matplotlib dependency, always present with it.

    arrays = []
    for i, b in enumerate(blobs):
        try:
            arrays.append(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")))
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad image bytes
            name = names[i] if names is not None else f"number {i}"
            raise damaged_file(f"image {name}", e, verb="cannot be decoded") from e
    if not arrays:
        raise ValueError("no images to decode")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images have different shapes {sorted(shapes)[:3]}; resize them first.")
    return np.stack(arrays)


_CHUNK_RE = re.compile(r"^(?P<split>.+)_\d+\.npz$")


def chunk_files(folder: Path, split: str) -> list[Path]:
    """The ``*.npz`` chunks of ``split`` in ``folder``, in name order.

    Chunks of the split under two names (``cifar10_train_*`` beside ``cifar100_train_*``, or
    ``train_*``: two data sets, or two copies, in one folder) raise
    :class:`DamagedDataError` naming them: read together they would silently train on both.
    """
    named: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.npz")):
        m = _CHUNK_RE.match(path.name)
        if m and (m.group("split") == split or m.group("split").endswith("_" + split)):
            named.setdefault(m.group("split"), []).append(path)
    if len(named) > 1:
        raise DamagedDataError(
            f"{folder} holds chunks of split {split!r} under {len(named)} names ("
            + ", ".join(f"{name}_NNN.npz: {len(paths)} file(s)" for name, paths in named.items())
            + "): two data sets or two copies in one folder; keep one set of chunks per "
              "split there (move the others to a folder of their own).")
    return next(iter(named.values()), [])


def read_chunks(files: list[Path]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Images, int32 labels and extra arrays (e.g. ``wnids``) from chunk files. A chunk that
    cannot be read raises :class:`DamagedDataError` naming it."""
    images, labels, extra = [], [], {}
    for path in files:
        try:
            chunk_images, chunk_labels, chunk_extra = _read_chunk(path)
        except DamagedDataError as e:
            raise DamagedDataError(f"{path}: {e}") from e
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise damaged_file(str(path), e) from e
        images.append(chunk_images)
        labels.append(chunk_labels)
        extra.update(chunk_extra)
    return np.concatenate(images), np.concatenate(labels), extra


def _read_chunk(path: Path):
    with np.load(path, allow_pickle=False) as chunk:
        blob, offsets = chunk["blob"], chunk["offsets"]
        if offsets.shape[0] != chunk["labels"].shape[0] + 1:
            raise ValueError("`offsets` must have len(labels) + 1 entries")
        names = chunk["names"] if "names" in chunk.files else None
        images = decode_images((blob[offsets[i]:offsets[i + 1]].tobytes()
                                for i in range(offsets.shape[0] - 1)),
                               names=None if names is None else [str(n) for n in names])
        extra = {key: chunk[key] for key in chunk.files
                 if key not in ("blob", "offsets", "labels", "names")}
        return images, chunk["labels"].astype(np.int32), extra


def read_image_tree(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images and labels from ``folder/split/<class>/*.png``; classes in sorted order."""
    root = folder / split
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    blobs, labels, paths = [], [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                blobs.append(path.read_bytes())
                labels.append(index)
                paths.append(str(path))
    if not blobs:
        raise DataNotFoundError(f"no images under {root}/<class>/*.png|jpg")
    return decode_images(blobs, names=paths), np.asarray(labels, np.int32), classes


#: The file that marks a folder holding the Tiny-ImageNet release layout.
WNIDS_FILE = "wnids.txt"
_VAL_ANNOTATIONS = Path("val") / "val_annotations.txt"


def read_wnid_release(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images, labels and the sorted wnids of ``split`` (``"train"`` or ``"val"``) from the
    Tiny-ImageNet release layout in ``folder`` (see the module docstring).

    Labels are indices into the sorted wnids of ``wnids.txt`` (the reference's numbering).
    A copy with a class's training images missing, an annotation naming an unknown wnid or a
    missing image, or an image without an annotation raises :class:`DamagedDataError` naming
    the file (an incomplete unzip must not train on fewer classes, or shift labels)."""
    wnids = _read_wnids(folder / WNIDS_FILE)
    index = {wnid: i for i, wnid in enumerate(wnids)}
    if split == "train":
        if not (folder / "train").is_dir():
            raise DataNotFoundError(f"split 'train' not found in {folder} (no train/ folder "
                                    f"beside its {WNIDS_FILE})")
        paths, labels = [], []
        for wnid in wnids:
            found = _release_images(folder / "train" / wnid / "images")
            if not found:
                raise DamagedDataError(
                    f"{folder / 'train' / wnid / 'images'} holds no images, but {WNIDS_FILE} "
                    f"lists {wnid}: the copy is incomplete; unzip the release again.")
            paths += found
            labels += [index[wnid]] * len(found)
    elif split == "val":
        if not (folder / "val").is_dir():
            raise DataNotFoundError(f"split 'val' not found in {folder} (no val/ folder beside "
                                    f"its {WNIDS_FILE})")
        annotated = _read_val_annotations(folder / _VAL_ANNOTATIONS, index)
        paths = _release_images(folder / "val" / "images")
        unlabelled = sorted({p.name for p in paths} - annotated.keys())
        missing = sorted(annotated.keys() - {p.name for p in paths})
        if unlabelled or missing:
            raise DamagedDataError(
                f"{folder / _VAL_ANNOTATIONS} and {folder / 'val' / 'images'} disagree: "
                + "; ".join(f"{len(names)} {what} (e.g. {', '.join(names[:3])})"
                            for names, what in ((missing, "annotated images are missing"),
                                                (unlabelled, "images have no annotation"))
                            if names)
                + "; unzip the release again.")
        labels = [annotated[p.name] for p in paths]
    else:
        raise DataNotFoundError(f"split {split!r} has no labels in the Tiny-ImageNet release "
                                f"layout of {folder} (train and val have)")
    images = decode_images([p.read_bytes() for p in paths], names=[str(p) for p in paths])
    return images, np.asarray(labels, np.int32), wnids


def _release_images(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _read_wnids(path: Path) -> list[str]:
    """``wnids.txt``'s class ids, sorted (the reference sorts them); duplicates refused."""
    try:
        wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise damaged_file(str(path), e) from e
    duplicated = sorted(w for w, n in collections.Counter(wnids).items() if n > 1)
    if not wnids or duplicated:
        raise DamagedDataError(f"{path} must list each class id once; "
                               + (f"{', '.join(duplicated[:3])} repeated" if duplicated
                                  else "it is empty") + ". Copy or download it again.")
    return sorted(wnids)


def _read_val_annotations(path: Path, index: dict[str, int]) -> dict[str, int]:
    """``{image file name: label}`` from ``val_annotations.txt`` (tab-separated: file name,
    wnid, then a bounding box)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise damaged_file(str(path), e) from e
    labels = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index or fields[0] in labels:
            why = ("has no tab-separated file name and class id" if len(fields) < 2 else
                   f"names {fields[1]!r}, which {WNIDS_FILE} does not list"
                   if fields[1] not in index else f"annotates {fields[0]} a second time")
            raise DamagedDataError(f"{path}, line {number}, {why}: copy or download it "
                                   f"again.")
        labels[fields[0]] = index[fields[1]]
    return labels


def file_stamp(files: Iterable[Path], *, relative_to: Path | None = None) -> tuple:
    """Names, sizes and modification times of ``files``: part of a cache's key, so that a file
    changed, added or removed since it was read is read again (a notebook that re-converts a
    data set and loads it again gets the new files, not the process's earlier decoding)."""
    stamp = []
    for f in files:
        st = f.stat()
        stamp.append((str(f.relative_to(relative_to)) if relative_to else f.name,
                      st.st_size, st.st_mtime_ns))
    return tuple(stamp)


#: The CIFAR python-version releases: marker file -> (files of each split, label key).
CIFAR_PYTHON_RELEASES = {
    "batches.meta": ({"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                      "test": ("test_batch",)}, "labels"),
    "meta": ({"train": ("train",), "test": ("test",)}, "fine_labels"),
}


def _cifar_python_release(folder: Path):
    """``(files of each split, label key)`` when ``folder`` holds a CIFAR python release."""
    for marker, release in CIFAR_PYTHON_RELEASES.items():
        files = release[0]
        if (folder / marker).is_file() and not (folder / files["train"][0]).is_dir():
            return release
    return None


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, numbers, bytes and NumPy arrays, and refuses every other global
    (a pickle's globals are how it runs code)."""
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}; a CIFAR batch holds "
                                         f"arrays, lists and numbers only")
        if module == "numpy.core.multiarray":  # Python 2 era pickles; numpy 2 renamed it
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def read_cifar_python(paths: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 32, 32, 3]`` and int32 labels from CIFAR python-version batches (dicts of
    ``data``: uint8 ``[n, 3072]``, channel planes of row-major pixels, and ``label_key``), in
    file order. A batch that cannot be read, or holds something else, raises
    :class:`DamagedDataError` naming it."""
    images, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                batch = _ArraysOnlyUnpickler(f, encoding="bytes").load()
            batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
            data, batch_labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or \
                    batch_labels.shape != (data.shape[0],):
                raise ValueError(f"`data` must be uint8 [n, 3072] with n `{label_key}`, got "
                                 f"{data.dtype} {data.shape} and {batch_labels.shape}")
        except (OSError, EOFError, KeyError, ValueError, TypeError, AttributeError,
                pickle.UnpicklingError) as e:
            raise damaged_file(str(path), e) from e
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels.astype(np.int32))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 32, 32, 3]`` and int32 labels (0-9) from an SVHN release file
    (``X``: uint8 ``[32, 32, 3, N]``; ``y``: ``[N, 1]``, 10 for the digit 0). A file that
    cannot be read, or holds something else, raises :class:`DamagedDataError` naming it."""
    from scipy import io as scipy_io  # a JAX dependency

    try:
        contents = scipy_io.loadmat(str(path))
        images, labels = np.asarray(contents["X"]), np.asarray(contents["y"]).reshape(-1)
        if images.dtype != np.uint8 or images.shape[:3] != (32, 32, 3) or \
                labels.shape != images.shape[3:]:
            raise ValueError(f"`X` must be uint8 [32, 32, 3, N] and `y` N labels, got "
                             f"{images.dtype} {images.shape} and {labels.shape}")
    except Exception as e:  # SciPy's parser raises many types for a damaged file  # noqa: BLE001
        raise damaged_file(str(path), e) from e
    labels = np.where(labels == 10, 0, labels).astype(np.int32)
    return np.ascontiguousarray(images.transpose(3, 0, 1, 2)), labels


def _layout(folder: Path, split: str) -> str | None:
    """Which layout :func:`read_local_images` reads ``split`` from (module docstring)."""
    if chunk_files(folder, split):
        return "chunks"
    if (folder / WNIDS_FILE).is_file():
        return "release"
    if _cifar_python_release(folder) is not None:
        return "cifar_python"
    if (folder / f"{split}_32x32.mat").is_file():
        return "svhn_mat"
    return "tree" if (folder / split).is_dir() else None


def _local_image_files(folder: Path, split: str, layout: str | None) -> list[Path]:
    """The files :func:`_read_local_images` reads for ``split`` in ``layout``
    (:func:`_layout`): its chunks; a release's files; or its tree's class folders (an empty
    one added still shifts the labels after it) and their images; empty when none is there."""
    if layout == "chunks":
        return chunk_files(folder, split)
    if layout == "cifar_python":
        files, _ = _cifar_python_release(folder)
        return [folder / name for name in files.get(split, ())]
    if layout == "svhn_mat":
        return [folder / f"{split}_32x32.mat"]
    if layout == "release":
        listed = [folder / WNIDS_FILE]
        if split == "train":
            return listed + [p for c in sorted((folder / "train").glob("*/images"))
                             for p in _release_images(c)]
        return listed + [folder / _VAL_ANNOTATIONS, *_release_images(folder / "val" / "images")]
    if layout is None:
        return []
    classes = sorted(p for p in (folder / split).iterdir() if p.is_dir())
    return classes + sorted(p for c in classes for p in c.iterdir()
                            if p.suffix.lower() in IMAGE_SUFFIXES)


def read_local_images(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """A split from a local folder in either layout; raises DataNotFoundError if absent.

    Decoded once per process (decoding CIFAR-10 takes seconds) and again when one of its files
    changed (:func:`file_stamp`), the new decoding taking the old one's place; the returned
    arrays are read-only views of that cache, which keeps the :data:`DECODED_SPLITS_KEPT`
    splits used last.
    """
    key = (str(folder), split)
    layout = _layout(folder, split)
    stamp = file_stamp(_local_image_files(folder, split, layout), relative_to=folder)
    cached = _DECODED.pop(key, None)  # re-inserted below: the most recently used goes last
    if cached is not None and cached[0] != stamp:
        cached = None  # the stale decoding is let go before the new one is made
    if cached is None:
        images, labels, extra = _read_local_images(folder, split, layout)
        for array in (images, labels, *extra.values()):
            array.flags.writeable = False
        cached = (stamp, (images, labels, extra))
    _DECODED[key] = cached
    while len(_DECODED) > DECODED_SPLITS_KEPT:
        _DECODED.pop(next(iter(_DECODED)))
    images, labels, extra = cached[1]
    return images, labels, dict(extra)


#: How many decoded splits :func:`read_local_images` keeps (Tiny ImageNet's training split
#: alone is 1.2 GB decoded).
DECODED_SPLITS_KEPT = 8
_DECODED: dict[tuple[str, str], tuple[tuple, tuple]] = {}  # (folder, split) -> (stamp, arrays)


def _read_local_images(folder: Path, split: str, layout: str | None):
    if layout == "chunks":
        return read_chunks(chunk_files(folder, split))
    if layout == "release":
        images, labels, wnids = read_wnid_release(folder, split)
        return images, labels, {"wnids": np.asarray(wnids)}
    if layout == "cifar_python":
        files, label_key = _cifar_python_release(folder)
        if split not in files:
            raise DataNotFoundError(f"split {split!r} is not in the CIFAR release in {folder} "
                                    f"(it has {' and '.join(files)})")
        return (*read_cifar_python([folder / name for name in files[split]], label_key), {})
    if layout == "svhn_mat":
        return (*read_svhn_mat(folder / f"{split}_32x32.mat"), {})
    if layout == "tree":
        images, labels, classes = read_image_tree(folder, split)
        return images, labels, {"classes": np.asarray(classes)}
    raise DataNotFoundError(f"split {split!r} not found in {folder} (looked for "
                            f"{split}_NNN.npz chunks and a {split}/<class>/ image tree)")


def read_tfds(name: str, split: str, data_dir=None, image_key="image", label_key="label", *,
              by_id: bool = False):
    """All examples of a prepared TFDS split as NumPy arrays, without TensorFlow: in TFDS's
    stored order, or with ``by_id`` in the original files' order that the examples' ``id``
    gives (:func:`original_order`; for splits taken by index, as CIFAR's)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise DataNotFoundError(
            f"TFDS source for {name!r} needs tensorflow-datasets: pip install 'calib_jax[tfds]'"
        ) from e
    try:
        with _absl_records_dropped_on_error():
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises several types for "not prepared"
        raise DataNotFoundError(
            f"TFDS data set {name!r} split {split!r} is not prepared in "
            f"{data_dir or '~/tensorflow_datasets'} ({type(e).__name__}: {e}). Prepare it once "
            f"with network access: pip install 'calib_jax[tfds]' tensorflow && python -c "
            f"\"import tensorflow_datasets as tfds; tfds.builder('{name}').download_and_prepare()\""
        ) from e
    n = len(source)
    examples = [source[i] for i in range(n)]
    if by_id:
        order = original_order([ex.get("id") for ex in examples],
                               what=f"TFDS {name!r} {split!r}")
        examples = [examples[i] for i in order]
    images = np.stack([np.asarray(ex[image_key], np.uint8) for ex in examples])
    labels = np.asarray([int(ex[label_key]) for ex in examples], np.int32)
    return images, labels


@contextlib.contextmanager
def _absl_records_dropped_on_error():
    """Holds what TFDS logs through absl during the block and logs it after, unless the block
    raises. TFDS logs a WARNING such as "Variant folder .../3.1.0 has no dataset_info.json"
    when it looks for a split that is not prepared, before it raises; the
    :class:`DataNotFoundError` raised then says what is missing and how to prepare it (and an
    evaluation skips an OOD set with that message), so the warning would only be noise above
    it. A prepared split's records are logged as usual, and other threads' records (e.g.
    Orbax's background saves) pass at once."""
    logger, held, this_thread = logging.getLogger("absl"), [], threading.get_ident()

    def hold(record):
        if record.thread != this_thread:
            return True
        held.append(record)
        return False

    logger.addFilter(hold)
    try:
        yield
    except BaseException:
        held.clear()
        raise
    finally:
        logger.removeFilter(hold)
        for record in held:
            logger.handle(record)


_ID_INDEX = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)$")


def original_order(ids, *, what: str = "the examples") -> np.ndarray:
    """The permutation that sorts examples by the index their ``id`` ends with.

    TFDS shuffles a data set's examples by a hash of their keys when it prepares them; its
    CIFAR builders give each example the ``id`` ``"<split>_<index in the original files>"``
    (``tensorflow_datasets/image_classification/cifar.py``), so sorting by it restores the
    order the reference's split indices refer to. Without an ``id`` on every example the
    stored order is kept; with ``id`` values that do not end in distinct indices of one
    prefix, too, with a warning (the split indices then select other images than the
    reference's)."""
    ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
    if not ids or any(i is None for i in ids):
        return np.arange(len(ids))
    matches = [_ID_INDEX.match(str(i)) for i in ids]
    if all(matches) and len({m["prefix"] for m in matches}) == 1:
        index = np.asarray([int(m["index"]) for m in matches])
        if np.unique(index).size == index.size:
            return np.argsort(index, kind="stable")
    warnings.warn(f"{what}: the examples' ids ({', '.join(map(repr, ids[:3]))}, ...) do not "
                  f"give their original order; the stored order is kept, so index-based "
                  f"splits select other examples than the reference's.", stacklevel=3)
    return np.arange(len(ids))


def list_files(pattern: str) -> list[str]:
    return sorted(glob.glob(pattern))
