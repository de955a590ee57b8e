"""Data sets by name, split as the reference splits them.

``load(name, split)`` returns a :class:`Dataset`: uint8 ``[N, H, W, 3]`` images
(or int32 token ids / trees for text) and int32 labels.

| name | splits | notes |
| --- | --- | --- |
| ``cifar10``, ``cifar100`` | train 45,000 / val 5,000 / test 10,000 | val = first 5,000 of ``np.random.seed(1); shuffle(range(50000))``, indices into the original order (the python release's, TFDS's put back by ``id``); read from ``cifar10/`` or the release as extracted, ``cifar-10-batches-py/`` (``cifar100/``, ``cifar-100-python/``) |
| ``svhn`` | test 26,032 | OOD set (TFDS ``svhn_cropped``, or the release's ``svhn/test_32x32.mat``) |
| ``cifar10_c`` | test 10,000 | Gaussian noise, severity 5: the release's files if present (``cifar10_c/`` or ``CIFAR-10-C/``: ``gaussian_noise.npy``, ``labels.npy``), else generated from the CIFAR-10 test set |
| ``tiny_imagenet`` | train 100,000 / val = test 10,000 | the reference tunes T on the official val split, which is also its test set (``Dataset.val_is_test``); read from our folder ``tinyimagenet/`` or the release as unzipped, ``tiny-imagenet-200/``; labels index the sorted wnids, as the reference's |
| ``20news`` | train / val / test | reference split: shuffle with seed 1, last 20 % test, 900 before it val |
| ``sst`` | train / val / test | binary: neutral roots dropped; trees in ``Dataset.extra["trees"]`` |
| ``synthetic`` | train 512 / val 128 / test 256 | a generated 4-class image task for smoke tests |

Sources (``source=``): ``"local"`` reads ``<data_dir>/<folder>`` (see
:mod:`calib_jax.data.sources`), ``"tfds"`` a prepared TFDS data set,
``"auto"`` (default) tries local then TFDS. Missing data raises
:class:`~calib_jax.data.sources.DataNotFoundError` saying what to get.
Local copies are read once per process: image splits by folder and split, the text sets
(all three splits at once) by folder, options and the files' sizes and modification times.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np

from calib_jax.data import sources
from calib_jax.data.sources import DamagedDataError, DataNotFoundError

__all__ = ["Dataset", "DamagedDataError", "DataNotFoundError", "cifar_split_indices",
           "fingerprint", "gaussian_noise", "load", "names", "normalization", "word_vectors"]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One split of a data set.

    Attributes:
      name, split: what was loaded.
      inputs: uint8 ``[N, H, W, 3]`` images, or int32 ``[N, L]`` token ids.
      labels: int32 ``[N]``.
      num_classes: label count of the data set.
      source: where it came from (a path, or ``tfds:<name>``, or ``generated``).
      val_is_test: the validation split is the test split (Tiny-ImageNet, as the
        reference evaluates it); reported numbers must say so.
      extra: anything else (class names, trees, vocabulary).
    """
    name: str
    split: str
    inputs: np.ndarray
    labels: np.ndarray
    num_classes: int
    source: str
    val_is_test: bool = False
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        # Checked once here for every source (local files, TFDS, generated, a user's own):
        # a label outside [0, num_classes) would otherwise reach training under `jit`, where
        # the losses can only turn it into NaN, and surface epochs later as a NaN model.
        labels = np.asarray(self.labels)
        where = f"{self.name} ({self.split}) from {self.source}"
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{where}: labels must be integers of shape [N], got dtype "
                             f"{labels.dtype} and shape {labels.shape}.")
        if len(self.inputs) != labels.shape[0]:
            raise ValueError(f"{where}: {len(self.inputs)} inputs but {labels.shape[0]} labels.")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)]
            raise ValueError(
                f"{where}: labels must be in [0, {self.num_classes}), found "
                f"{np.unique(bad)[:5].tolist()} ({bad.size} of {labels.size}). Store class "
                f"indices 0..{self.num_classes - 1} (e.g. not 1-based ones).")

    def __len__(self):
        return int(self.labels.shape[0])


# Reference normalisation constants (mean, std) per channel.
CIFAR10_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def normalization(name: str, split: str, *, reference_cifar100_test: bool = True):
    """Per-channel ``(mean, std)`` the reference normalises ``name/split`` with.

    CIFAR-10, SVHN and CIFAR-10-C use the CIFAR-10 constants; so do CIFAR-100
    train/val. The reference normalises the **CIFAR-100 test set with ImageNet
    constants** (``Data/cifar100.py``); ``reference_cifar100_test=True`` (the
    default) copies that, ``False`` uses the CIFAR-10 constants everywhere.
    Tiny-ImageNet uses ImageNet constants.
    """
    if name == "cifar100" and split == "test" and reference_cifar100_test:
        return IMAGENET_MEAN_STD
    if name == "tiny_imagenet":
        return IMAGENET_MEAN_STD
    if name in ("cifar10", "cifar100", "svhn", "cifar10_c", "synthetic", "synthetic_c"):
        return CIFAR10_MEAN_STD
    raise ValueError(f"no image normalisation for {name!r}")


def cifar_split_indices(num_train: int = 50000, num_val: int = 5000):
    """(train, val) indices of the reference: seed 1 shuffle, first 5,000 are val."""
    indices = list(range(num_train))
    rng = np.random.RandomState(1)  # the global np.random.seed(1) stream
    rng.shuffle(indices)
    indices = np.asarray(indices)
    return indices[num_val:], indices[:num_val]


def gaussian_noise(images: np.ndarray, *, severity: int = 5, seed: int = 0) -> np.ndarray:
    """CIFAR-10-C Gaussian noise (Hendrycks & Dietterich 2019), deterministic given ``seed``.

    ``x / 255 + N(0, c^2)``, clipped to [0, 1], back to uint8, with
    ``c = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]`` (the published CIFAR
    constants; severity 5 is the paper's OOD set).
    """
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"`severity` must be in 1..5, got {severity}.")
    c = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]
    rng = np.random.default_rng(seed)
    x = images.astype(np.float32) / 255.0
    noisy = np.clip(x + rng.normal(size=x.shape, scale=c).astype(np.float32), 0.0, 1.0)
    # The published code casts with np.uint8(x * 255), i.e. truncation.
    return (noisy * 255).astype(np.uint8)


# The image shape of each named image data set: its models and normalisation are the
# paper's for that size, so a local copy of another size is refused, not trained on.
_IMAGE_SHAPES = {"cifar10": (32, 32, 3), "cifar100": (32, 32, 3), "svhn": (32, 32, 3),
                 "cifar10_c": (32, 32, 3), "tiny_imagenet": (64, 64, 3)}
_TFDS_NAMES = {"cifar10": "cifar10", "cifar100": "cifar100", "svhn": "svhn_cropped"}
# Splits taken by index (the reference's CIFAR validation split) need the original order.
_TFDS_BY_ID = ("cifar10", "cifar100")
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "cifar10_c": 10,
                "tiny_imagenet": 200, "20news": 20, "sst": 2, "synthetic": 4, "synthetic_c": 4}


def names() -> list[str]:
    return sorted(_NUM_CLASSES)


def fingerprint(dataset: Dataset) -> str:
    """``"sha256:<hex>"`` of a split's content: its inputs' and labels' dtypes, shapes and
    bytes, in order (not its name, source or ``extra``: the same images from TFDS or from files
    match; the same images in another order, or one pixel changed, do not). Evaluations record
    it (``results.json``'s ``data.fingerprints``), so that ``calib_jax.compare`` pairs two runs'
    examples only where they are the same examples (CIFAR-10-C's 10,000 images are the
    release's where its files are found, else generated: two such sets have one name and
    size). 0.03 s for CIFAR-10's test set (30 MB; this project's 2-core CPU).

    >>> import numpy as np
    >>> a = Dataset("x", "test", np.zeros((2, 1, 1, 3), np.uint8), np.array([0, 1]), 2, "here")
    >>> b = Dataset("y", "test", a.inputs.copy(), a.labels.copy(), 2, "there")
    >>> fingerprint(a) == fingerprint(b), fingerprint(a)[:7]
    (True, 'sha256:')
    """
    digest = hashlib.sha256()
    for array in (np.asarray(dataset.inputs), np.asarray(dataset.labels)):
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).data)
    return f"sha256:{digest.hexdigest()}"


def _images(folder: str | tuple[str, ...], tfds_name: str | None, split: str, data_dir,
            source: str, what: str, *, also: str = ""):
    """(images, labels, origin, extra) from the local folder (the first of ``folder``'s names
    found, see :func:`sources.find_folder`) or TFDS; ``also`` adds a way to provide the data
    to the not-found message."""
    errors = []
    names = (folder,) if isinstance(folder, str) else folder
    if source in ("auto", "local"):
        path = sources.find_folder(names, data_dir)
        if path is not None:
            try:
                images, labels, extra = sources.read_local_images(path, split)
                return images, labels, str(path), extra
            except DataNotFoundError as e:
                errors.append(str(e))
        else:
            errors.append(f"no {' or '.join(n + '/' for n in names)} folder in "
                          f"{[str(d) for d in sources.candidate_data_dirs(data_dir)]}")
    if source in ("auto", "tfds") and tfds_name is not None:
        try:
            images, labels = sources.read_tfds(tfds_name, split, data_dir=None if source == "auto"
                                               else data_dir, by_id=tfds_name in _TFDS_BY_ID)
            return images, labels, f"tfds:{tfds_name}", {}
        except DataNotFoundError as e:
            errors.append(str(e))
    raise DataNotFoundError(
        f"{what} ({split}) not found. Either put it in <data_dir>/{names[0]}/ as "
        f"{split}_NNN.npz chunks or a {split}/<class>/*.png tree (data_dir = the `data_dir` "
        f"argument or ${sources.ENV_DATA_DIR})"
        + (f", or prepare TFDS '{tfds_name}'" if tfds_name else "") + also
        + ". Details: " + " | ".join(errors))


def _check_images(ds: Dataset) -> Dataset:
    """``ds``, once its images have the data set's shape and an image tree a folder per class."""
    want = _IMAGE_SHAPES.get(ds.name)
    if want is not None and (ds.inputs.dtype != np.uint8 or ds.inputs.shape[1:] != want):
        raise ValueError(f"{ds.name} ({ds.split}) from {ds.source}: images must be uint8 "
                         f"{want}, got {ds.inputs.dtype} {ds.inputs.shape[1:]}; store the data "
                         f"set at its own size (the models and recipes are the paper's for it).")
    classes = ds.extra.get("classes")
    if classes is not None and len(classes) != ds.num_classes:
        shown = ", ".join(map(str, list(classes)[:12])) + (", ..." if len(classes) > 12 else "")
        raise ValueError(f"{ds.name} ({ds.split}) from {ds.source}: the image tree has "
                         f"{len(classes)} class folders ({shown}), the data set {ds.num_classes}. "
                         f"Labels are the indices of the sorted folder names, so a missing "
                         f"folder would shift every later class: give each class its folder.")
    return ds


def _check_split(name, split, allowed):
    if split not in allowed:
        raise ValueError(f"`split` of {name!r} must be one of {allowed}, got {split!r}.")


#: Where a CIFAR copy is looked for in each data directory: our folder, then the python-version
#: release's own (what torchvision extracts and the reference reads).
CIFAR_FOLDERS = {"cifar10": ("cifar10", "cifar-10-batches-py"),
                 "cifar100": ("cifar100", "cifar-100-python")}
CIFAR_URLS = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
              "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}


def _cifar(name, split, data_dir, source):
    _check_split(name, split, ("train", "val", "test"))
    images, labels, origin, extra = _images(
        CIFAR_FOLDERS[name], _TFDS_NAMES[name], "test" if split == "test" else "train",
        data_dir, source, name.upper(),
        also=f", or extract the python version ({CIFAR_URLS[name]}) into <data_dir>/ as it "
             f"comes (<data_dir>/{CIFAR_FOLDERS[name][1]}/)")
    if split != "test":
        if images.shape[0] != 50000:
            raise ValueError(f"{name} train must have 50,000 images, got {images.shape[0]} "
                             f"from {origin}.")
        train_idx, val_idx = cifar_split_indices()
        idx = train_idx if split == "train" else val_idx
        images, labels = images[idx], labels[idx]
    return Dataset(name, split, images, labels, _NUM_CLASSES[name], origin, extra=extra)


def _cifar10_c(split, data_dir, source, severity=5, seed=0):
    _check_split("cifar10_c", split, ("test",))
    path = sources.find_folder(("cifar10_c", "CIFAR-10-C"), data_dir)
    if path is not None and (path / "gaussian_noise.npy").exists():
        # The official release (CIFAR-10-C.tar extracted): 5 severities x 10,000 images, and
        # labels.npy. Memory-mapped: only the severity asked for is read.
        files = [path / "gaussian_noise.npy", path / "labels.npy"]
        try:
            noisy, all_labels = (np.load(f, mmap_mode="r", allow_pickle=False) for f in files)
            if noisy.dtype != np.uint8 or noisy.shape != (50000, 32, 32, 3) or \
                    all_labels.shape != (50000,):
                raise ValueError(f"expected uint8 images (50000, 32, 32, 3) and 50,000 labels, "
                                 f"got {noisy.dtype} {noisy.shape} and {all_labels.shape}")
            images = np.array(noisy[(severity - 1) * 10000:severity * 10000])
            labels = np.array(all_labels[(severity - 1) * 10000:severity * 10000], np.int32)
        except (OSError, ValueError) as e:
            raise sources.damaged_file(f"{files[0]} or {files[1].name}", e) from e
        return Dataset("cifar10_c", split, images, labels, 10, str(path))
    clean = load("cifar10", "test", data_dir=data_dir, source=source)
    return Dataset("cifar10_c", split, gaussian_noise(clean.inputs, severity=severity, seed=seed),
                   clean.labels, 10, f"generated from {clean.source} (gaussian_noise, "
                   f"severity {severity}, seed {seed})", extra={"generated": True})


#: Where a Tiny-ImageNet copy is looked for in each data directory: our folder, then the
#: release's own (``tiny-imagenet-200.zip`` unzipped as it comes).
TINY_IMAGENET_FOLDERS = ("tinyimagenet", "tiny-imagenet-200")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _tiny_imagenet(split, data_dir, source):
    _check_split("tiny_imagenet", split, ("train", "val", "test"))
    folder_split = "train" if split == "train" else "val"
    images, labels, origin, extra = _images(
        TINY_IMAGENET_FOLDERS, None, folder_split, data_dir, source, "Tiny-ImageNet-200",
        also=f", or unzip the release ({TINY_IMAGENET_URL}) into <data_dir>/ as it comes "
             f"(<data_dir>/tiny-imagenet-200/wnids.txt, train/, val/)")
    labels, extra = _labels_by_sorted_wnid(labels, extra, origin)
    return Dataset("tiny_imagenet", split, images, labels, 200, origin,
                   val_is_test=split != "train", extra=extra)


def _labels_by_sorted_wnid(labels: np.ndarray, extra: dict, origin: str):
    """Tiny-ImageNet labels numbered as the reference numbers them, by the sorted wnids,
    whatever order a copy stored them in (chunks carry their own ``wnids``: the offline copy's
    follow ``wnids.txt``'s unsorted order), so that a training split in one layout and a
    validation split in another agree, and a model trained here reads the reference's
    class indices."""
    if "wnids" not in extra:  # an image tree: labels are already its sorted folder names
        return labels, extra
    wnids = np.asarray(extra["wnids"]).astype(str)
    if len(wnids) != 200 or len(set(wnids.tolist())) != 200:
        raise ValueError(f"tiny_imagenet from {origin}: its class list (`wnids`) must hold "
                         f"200 distinct class ids, got {len(set(wnids.tolist()))} distinct of "
                         f"{len(wnids)}; copy or convert the data set again.")
    order = np.argsort(wnids, kind="stable")
    if np.array_equal(order, np.arange(200)) or labels.size == 0 or \
            labels.min() < 0 or labels.max() >= 200:  # sorted already; or refused by Dataset
        return labels, extra
    rank = np.empty(200, np.int32)
    rank[order] = np.arange(200, dtype=np.int32)
    remapped = rank[labels]
    remapped.flags.writeable = False  # as the cached arrays it replaces
    return remapped, {**extra, "wnids": wnids[order]}


#: Where 20 Newsgroups is looked for in each data directory: our folder (``*.jsonl.gz``
#: posts), then the reference's ``20_newsgroup/`` (``news20.tar.gz`` extracted: a folder per
#: newsgroup, a file per post).
NEWS20_FOLDERS = ("20news", "20_newsgroup")


def _check_vocabulary(vocabulary):
    if vocabulary not in ("all", "train"):
        raise ValueError(f"`vocabulary` must be 'all' (the reference's: the words of every "
                         f"split) or 'train' (the training split's only), got {vocabulary!r}.")


def _20news(split, data_dir, vocab_size=20000, max_len=1000, vocabulary="all"):
    _check_split("20news", split, ("train", "val", "test"))
    _check_vocabulary(vocabulary)
    path = sources.find_folder(NEWS20_FOLDERS, data_dir)
    files = _20news_files(path) if path is not None else []
    if not files:
        raise DataNotFoundError(
            f"20 Newsgroups not found{f' in {path}' if path is not None else ''}: put the "
            f"'bydate' posts as <data_dir>/20news/20news_bydate_{{train,test}}_NNN.jsonl.gz (one "
            f"JSON {{id, label, text}} a line) and classes.json, or the reference's "
            f"news20.tar.gz extracted (<data_dir>/20_newsgroup/<newsgroup>/<number>), with "
            f"data_dir the argument or ${sources.ENV_DATA_DIR}.")
    tokens, labels, vocab = _20news_splits(str(path), sources.file_stamp(files, relative_to=path),
                                           vocab_size, max_len, vocabulary)
    return Dataset("20news", split, tokens[split], labels[split], 20, str(path),
                   extra={"vocab": dict(vocab), "max_len": max_len})


def _20news_files(folder: Path) -> list[Path]:
    """Our ``*.jsonl.gz`` posts, else the reference's folder per newsgroup (its posts: the
    files named by a number, as the reference reads them; the groups in sorted order)."""
    files = sorted(folder.glob("*.jsonl.gz"))
    if files:
        return files
    groups = sorted(p for p in folder.iterdir() if p.is_dir())
    return groups + [f for g in groups for f in sorted(g.iterdir(), key=lambda f: f.name)
                     if f.name.isdigit()]


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # shared by every load of the split (a cache's value)
    return array


def _20news_posts(folder: Path, stamp: tuple) -> tuple[list[str], list[int]]:
    """The posts' texts and labels, in the order the split's shuffle refers to: our files' order,
    or the reference's (groups sorted by name, each group's posts by file name)."""
    texts, labels = [], []
    names = [name for name, _, _ in stamp]
    if names[0].endswith(".jsonl.gz"):
        for name in names:
            path = folder / name
            try:
                with gzip.open(path, "rt", encoding="utf-8") as f:
                    posts = [json.loads(line) for line in f]
                texts.extend(p["text"] for p in posts)
                labels.extend(int(p["label"]) for p in posts)
            except (OSError, EOFError, ValueError, KeyError, TypeError) as e:  # gzip, JSON
                raise sources.damaged_file(str(path), e) from e
        return texts, labels
    parts = [Path(name).parts for name in names]  # (group,) or (group, post)
    groups = [p[0] for p in parts if len(p) == 1]
    for name, (group, *post) in zip(names, parts):
        if post:
            try:  # latin-1, as the reference opens them: every byte is a character
                texts.append((folder / name).read_text(encoding="latin-1"))
            except OSError as e:
                raise sources.damaged_file(str(folder / name), e) from e
            labels.append(groups.index(group))
    if len(groups) != 20:
        raise DamagedDataError(f"{folder} must hold a folder for each of the 20 newsgroups, got "
                               f"{len(groups)} ({', '.join(groups[:4])}, ...); extract "
                               f"news20.tar.gz again.")
    return texts, labels


@functools.lru_cache(maxsize=2)
def _20news_splits(folder: str, stamp: tuple, vocab_size: int, max_len: int, vocabulary: str):
    """All three splits of 20 Newsgroups, encoded as the reference encodes them
    (``NewsGroup/ng_loader.py``: Keras' ``Tokenizer(num_words=vocab_size)`` and
    ``pad_sequences(maxlen=max_len)``): ``({split: tokens}, {split: labels}, vocab)``, arrays
    read-only.

    Each post loses its header (up to its first blank line); its words are Keras's (lower
    case, split at spaces and punctuation other than ``'``); the vocabulary is the
    ``vocab_size - 1`` most frequent words of every post (``vocabulary="all"``: the
    reference fits its tokenizer before splitting; ``"train"``: of the training posts), ties
    in order of first appearance, ids 1, 2, ...; other words are dropped; a post keeps its
    **last** ``max_len`` ids, left-padded with 0. Cached per process: reading, tokenising
    and counting the posts takes ~2 s, and a run loads two splits (training: train and val;
    evaluation: val and test)."""
    texts, labels = _20news_posts(Path(folder), stamp)
    labels = np.asarray(labels, np.int32)
    # The reference: shuffle everything with seed 1, last 20 % test, 900 before it val.
    order = np.arange(len(texts))
    np.random.RandomState(1).shuffle(order)
    n_test = int(0.2 * len(order))
    if len(order) - n_test - 900 < 1:
        raise DataNotFoundError(
            f"{folder} holds {len(order)} posts: too few for the reference's split (20 % test, "
            f"900 val, the rest train); put the whole 'bydate' set there.")
    indices = {"train": order[:len(order) - n_test - 900],
               "val": order[len(order) - n_test - 900:len(order) - n_test],
               "test": order[len(order) - n_test:]}
    words = [_keras_words(_without_header(t)) for t in texts]
    counted = range(len(words)) if vocabulary == "all" else np.sort(indices["train"])
    vocab = _build_vocab((words[i] for i in counted), vocab_size, reserved=1,
                         ties="first")
    tokens = {split: np.stack([_encode([vocab[w] for w in words[i] if w in vocab], max_len)
                               for i in index]) for split, index in indices.items()}
    return ({s: _read_only(t) for s, t in tokens.items()},
            {s: _read_only(labels[i]) for s, i in indices.items()}, vocab)


def _without_header(post: str) -> str:
    """The post from its first blank line on (the reference's ``t[t.find('\\n\\n'):]``)."""
    i = post.find("\n\n")
    return post[i:] if i > 0 else post


#: What Keras's ``text_to_word_sequence`` turns into spaces (its default ``filters``).
_KERAS_FILTERS = str.maketrans({c: " " for c in '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'})


def _keras_words(text: str) -> list[str]:
    """Keras's ``text_to_word_sequence``: lower case, filters to spaces, split at spaces."""
    return [w for w in text.lower().translate(_KERAS_FILTERS).split(" ") if w]


def _build_vocab(word_lists, max_words, reserved=2, *, ties="word"):
    """Word -> id for the ``max_words - reserved`` most frequent words of ``word_lists`` (one
    list of words per text), ids from ``reserved`` on: the ids below are reserved (20
    Newsgroups: 0 = padding; SST: 0 = unknown). Ties by word (``ties="word"``), or in order
    of first appearance (``"first"``: Keras's ``Tokenizer(num_words=max_words)`` with
    ``reserved=1``)."""
    counts: collections.Counter = collections.Counter()  # insertion order = first appearance
    for words in word_lists:
        counts.update(words)
    key = (lambda w: (-counts[w], w)) if ties == "word" else (lambda w: -counts[w])
    ranked = sorted(counts, key=key)[:max_words - reserved]  # a stable sort
    return {w: i + reserved for i, w in enumerate(ranked)}


def _encode(ids, max_len):
    """A post's last ``max_len`` word ids, left-padded with 0 to ``max_len`` (Keras's
    ``pad_sequences`` defaults: padding and truncation both at the front)."""
    out = np.zeros(max_len, np.int32)
    if ids:
        kept = ids[-max_len:]
        out[max_len - len(kept):] = kept
    return out


def word_vectors(vocab: dict, path, *, vocab_size: int) -> np.ndarray:
    """The ``[vocab_size, dim]`` float32 embedding table of a text data set's vocabulary
    (``Dataset.extra["vocab"]``, word -> id) from a GloVe-format text file (``word v1 ... vd``
    a line, e.g. ``glove.6B.100d.txt``), as the reference builds it: row ``id`` holds the
    word's vector, rows of ids no word has or of words the file lacks stay 0. Save it with
    ``np.save`` and pass it as ``config.embeddings_path`` (``train_embeddings=false`` freezes
    it, as the reference's 20 Newsgroups model does).

    >>> import tempfile, os
    >>> glove = os.path.join(tempfile.mkdtemp(), "vectors.txt")
    >>> _ = open(glove, "w").write("the 0.5 -1.0\\nzebra 2.0 3.0\\n")
    >>> word_vectors({"the": 1, "cat": 2}, glove, vocab_size=3)
    array([[ 0. ,  0. ],
           [ 0.5, -1. ],
           [ 0. ,  0. ]], dtype=float32)
    """
    if vocab and max(vocab.values()) >= vocab_size:
        raise ValueError(f"`vocab` holds ids up to {max(vocab.values())}, beyond `vocab_size` = "
                         f"{vocab_size}: give the vocabulary size the model was built with.")
    table = None
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                word, _, values = line.rstrip("\n").partition(" ")
                if table is None:
                    table = np.zeros((vocab_size, len(values.split(" "))), np.float32)
                if word in vocab:
                    vector = np.asarray(values.split(" "), np.float32)
                    if vector.shape != table.shape[1:]:
                        raise ValueError(f"line {number} holds {vector.size} numbers, the first "
                                         f"line {table.shape[1]}")
                    table[vocab[word]] = vector
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise sources.damaged_file(str(path), e) from e
    if table is None:
        raise sources.DamagedDataError(f"{path} is empty; give a GloVe-format file "
                                       f"(`word v1 ... vd` a line).")
    return table


_SST_FILES = {"train": "train.txt", "val": "dev.txt", "test": "test.txt"}
# The reference's SST binary phrase classes (treeLSTM/dataset.py): sentiment 0-1 negative,
# 2 neutral, 3-4 positive; a binary sentence label is one of SST_SENTENCE_CLASSES.
SST_PHRASE_CLASSES = {0: 0, 1: 0, 2: 1, 3: 2, 4: 2}
SST_SENTENCE_CLASSES = (0, 2)  # negative, positive: sentence labels 0 and 1


def _sst(split, data_dir, vocab_size=20000, max_nodes=None, vocabulary="all",
         phrase_labels=False):
    """SST binary as packed trees: ``inputs`` int32 ``[N, 3, M]`` (see models.text.pack_trees),
    ``[N, 4, M]`` with every node's phrase class (:data:`SST_PHRASE_CLASSES`)."""
    _check_split("sst", split, ("train", "val", "test"))
    _check_vocabulary(vocabulary)
    if not isinstance(phrase_labels, bool):
        raise ValueError(f"`phrase_labels` must be True or False, got {phrase_labels!r}.")
    path = sources.find_folder("sst", data_dir)
    missing = [f for f in _SST_FILES.values() if path is None or not (path / f).is_file()]
    if missing:
        raise DataNotFoundError(
            f"SST not found{f' (no {missing} in {path})' if path is not None else ''}: put "
            f"PTB-style trees as <data_dir>/sst/{{train,dev,test}}.txt, with data_dir the "
            f"argument or ${sources.ENV_DATA_DIR}.")
    stamp = sources.file_stamp(path / f for f in _SST_FILES.values())
    packed, labels, parsed, max_nodes = _sst_split(str(path), stamp, vocab_size, max_nodes,
                                                   split, vocabulary, phrase_labels)
    return Dataset("sst", split, packed, labels, 2, str(path),
                   extra={"trees": parsed, "vocab": dict(_sst_corpus(str(path), stamp, vocab_size,
                                                                     vocabulary)[1]),
                          "max_nodes": max_nodes})


@functools.lru_cache(maxsize=2)
def _sst_corpus(folder: str, stamp: tuple, vocab_size: int, vocabulary: str):
    """The three SST files parsed (``{split: [tree]}``, trees as tuples), the vocabulary (of
    every split's sentences, as the reference's ``vocab-cased.txt``, or with
    ``vocabulary="train"`` the training sentences') and the largest tree's node count.
    Cached per process (``stamp``: see :func:`calib_jax.data.sources.file_stamp`): every
    split needs the vocabulary and, by default, that count."""
    read = {split: _read_sst_file(Path(folder) / file) for split, file in _SST_FILES.items()}
    # 0 = unknown; then the most frequent words (the leaves' words; inner nodes None).
    counted = read["train"] if vocabulary == "train" else [t for ts in read.values() for t in ts]
    vocab = _build_vocab(([w for w in tree[1] if w is not None] for tree in counted),
                         vocab_size, reserved=1)
    return read, vocab, max(len(t[1]) for trees in read.values() for t in trees)


def _read_sst_file(path: Path) -> list[tuple]:
    """The trees of one SST file (:func:`calib_jax.models.text.parse_ptb_tree`, as tuples);
    a file that cannot be read or parsed raises :class:`DamagedDataError` naming the line."""
    from calib_jax.models.text import parse_ptb_tree
    trees, number = [], 0
    try:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                trees.append(tuple(tuple(part) if isinstance(part, list) else part
                                   for part in parse_ptb_tree(line)))
    except (OSError, ValueError, IndexError) as e:  # unreadable, not UTF-8, not a tree
        where = f"{path}, line {number}" if number else str(path)
        raise sources.damaged_file(where, e) from e
    return trees


@functools.lru_cache(maxsize=6)
def _sst_split(folder: str, stamp: tuple, vocab_size: int, max_nodes: int | None, split: str,
               vocabulary: str, phrase_labels: bool = False):
    """One SST split, binary, packed: ``(packed, labels, trees, max_nodes)``, arrays
    read-only; only this split's trees must fit an explicit ``max_nodes``."""
    from calib_jax.models.text import make_trees, pack_trees
    read, vocab, largest = _sst_corpus(folder, stamp, vocab_size, vocabulary)
    max_nodes = largest if max_nodes is None else max_nodes
    parsed = tuple(t for t in read[split] if t[0] != 2)  # binary task: drop neutral roots
    # A sentence's label is the position of its root's phrase class among the sentence
    # classes (0 negative, 1 positive): the model reads the root's outputs in that order.
    labels = np.asarray([SST_SENTENCE_CLASSES.index(SST_PHRASE_CLASSES[t[0]]) for t in parsed],
                        np.int32)
    packed = pack_trees(make_trees(parsed, vocab, max_nodes=max_nodes,
                                   node_classes=SST_PHRASE_CLASSES if phrase_labels else None))
    return _read_only(packed), _read_only(labels), parsed, max_nodes


_SYNTHETIC_SIZES = {"train": 512, "val": 128, "test": 256}


def _synthetic(split, num_classes=4, seed=0):
    """A small learnable image task for smoke tests and CPU checks (not a benchmark).

    32x32 RGB noise with the class written as a bright quadrant / stripe pattern;
    deterministic given ``seed`` and the split.
    """
    _check_split("synthetic", split, tuple(_SYNTHETIC_SIZES))
    n = _SYNTHETIC_SIZES[split]
    rng = np.random.default_rng([seed, ("train", "val", "test").index(split)])
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    images = rng.integers(0, 80, (n, 32, 32, 3)).astype(np.uint8)
    for i, y in enumerate(labels):
        rows = slice((y % 2) * 16, (y % 2 + 1) * 16)
        cols = slice((y // 2 % 2) * 16, (y // 2 % 2 + 1) * 16)
        images[i, rows, cols, y % 3] += 150
    return Dataset("synthetic", split, images, labels, num_classes, "generated",
                   extra={"generated": True})


def load(name: str, split: str, *, data_dir=None, source: str = "auto", **options) -> Dataset:
    """Loads one split of a data set by name (see the module docstring).

    Args:
      name: one of :func:`names`.
      split: ``"train"``, ``"val"`` or ``"test"`` (what the data set has).
      data_dir: a directory holding the local copies (else ``$CALIB_JAX_DATA_DIR``,
        else ``../shared/data`` beside the repository).
      source: ``"auto"``, ``"local"`` or ``"tfds"`` (images only).
      options: ``cifar10_c``: ``severity`` (5), ``seed`` (0) for the generated set;
        ``20news``: ``vocab_size`` (20000), ``max_len`` (1000); ``sst``:
        ``vocab_size`` (20000), ``max_nodes`` (default: the largest tree); both text sets:
        ``vocabulary``, ``"all"`` (the reference's: the words of every split) or
        ``"train"`` (the training split's words; the others' read as unknown / dropped);
        ``sst``: ``phrase_labels`` (False) adds every node's class (negative / neutral /
        positive, :data:`SST_PHRASE_CLASSES`) as the packed trees' fourth row.
    """
    if source not in ("auto", "local", "tfds"):
        raise ValueError(f"`source` must be 'auto', 'local' or 'tfds', got {source!r}.")
    return _check_images(_load(name, split, data_dir, source, **options))


def _load(name, split, data_dir, source, **options) -> Dataset:
    if name in ("cifar10", "cifar100"):
        return _cifar(name, split, data_dir, source)
    if name == "svhn":
        _check_split(name, split, ("test",))
        images, labels, origin, extra = _images(
            "svhn", _TFDS_NAMES["svhn"], "test", data_dir, source, "SVHN",
            also=" (or the release's test_32x32.mat, http://ufldl.stanford.edu/housenumbers/, "
                 "in <data_dir>/svhn/)")
        return Dataset("svhn", split, images, labels, 10, origin, extra=extra)
    if name == "cifar10_c":
        return _cifar10_c(split, data_dir, source, **options)
    if name == "tiny_imagenet":
        return _tiny_imagenet(split, data_dir, source)
    if name == "20news":
        return _20news(split, data_dir, **options)
    if name == "synthetic":
        return _synthetic(split, **options)
    if name == "synthetic_c":  # OOD partner of "synthetic": its test set with Gaussian noise
        clean = _synthetic(split, **options)
        return Dataset("synthetic_c", split, gaussian_noise(clean.inputs, severity=5),
                       clean.labels, clean.num_classes, "generated", extra={"generated": True})
    if name == "sst":
        return _sst(split, data_dir, **options)
    raise ValueError(f"unknown data set {name!r}; choose one of {names()}.")
