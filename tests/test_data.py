"""calib_jax.data: data sets by name, local sources, TFDS, splits and normalisation."""

import gc
import io
import os
import pickle
import weakref
from pathlib import Path

import numpy as np
import pytest

from calib_jax.data import datasets, sources
from calib_jax.data.sources import DataNotFoundError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "cifar10").is_dir(),
                                  reason=f"offline data copy not found at {SHARED}")


def png_bytes(array):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_chunks(folder: Path, split: str, images, labels, per_chunk=3):
    folder.mkdir(parents=True, exist_ok=True)
    for c, start in enumerate(range(0, len(labels), per_chunk)):
        blobs = [png_bytes(im) for im in images[start:start + per_chunk]]
        offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        np.savez(folder / f"{folder.name}_{split}_{c:03d}.npz",
                 blob=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
                 labels=np.asarray(labels[start:start + per_chunk], np.uint8),
                 names=np.asarray([f"{i}.png" for i in range(len(blobs))]))


def random_images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_chunk_source_round_trip(tmp_path):
    images, labels = random_images(7), np.arange(7) % 3
    write_chunks(tmp_path / "svhn", "test", images, labels)
    ds = datasets.load("svhn", "test", data_dir=tmp_path, source="local")
    np.testing.assert_array_equal(ds.inputs, images)  # PNG is lossless
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.labels.dtype == np.int32 and ds.source == str(tmp_path / "svhn")
    assert not ds.inputs.flags.writeable  # the cached copy cannot be corrupted


def test_chunks_of_one_split_under_two_names_are_refused(tmp_path):
    """cifar10_train_* beside cifar100_train_* (or a second copy named train_*) in one
    folder: read together they would train on both sets; refused, naming both. Another
    split's chunks beside them are no conflict."""
    images, labels = random_images(4), np.arange(4) % 2
    write_chunks(tmp_path / "svhn", "test", images, labels)
    write_chunks(tmp_path / "svhn", "train", images, labels)  # svhn_train_*: another split
    assert len(datasets.load("svhn", "test", data_dir=tmp_path, source="local")) == 4
    (tmp_path / "svhn" / "svhn_test_000.npz").rename(tmp_path / "svhn" / "other_test_000.npz")
    with pytest.raises(sources.DamagedDataError,
                       match=r"holds chunks of split 'test' under 2 names \(other_test_NNN.npz: "
                             r"1 file\(s\), svhn_test_NNN.npz: 1 file\(s\)\)"):
        datasets.load("svhn", "test", data_dir=tmp_path, source="local")


def test_local_images_are_decoded_once_and_again_when_a_file_changes(tmp_path, monkeypatch):
    decoded = []  # images decoded, per call
    real_decode = sources.decode_images
    monkeypatch.setattr(sources, "decode_images",
                        lambda blobs, names=None: decoded.append(1) or real_decode(blobs, names))
    images = random_images(4)
    write_chunks(tmp_path / "svhn", "test", images, np.arange(4) % 2, per_chunk=2)
    first = datasets.load("svhn", "test", data_dir=tmp_path, source="local")
    again = datasets.load("svhn", "test", data_dir=tmp_path, source="local")
    assert len(decoded) == 2 and again.inputs is first.inputs  # one decoding per chunk, shared
    # A notebook that converts the data set again and reloads it gets the new images, and
    # the earlier decoding is let go (not kept beside the new one).
    stale = weakref.ref(sources.read_local_images(tmp_path / "svhn", "test")[0])
    del first, again
    write_chunks(tmp_path / "svhn", "test", images[::-1], np.arange(4) % 2, per_chunk=2)
    np.testing.assert_array_equal(
        datasets.load("svhn", "test", data_dir=tmp_path, source="local").inputs, images[::-1])
    gc.collect()
    assert stale() is None
    # The same in an image tree: an image rewritten, then one more image.
    names, trees = [f"c{i}" for i in range(10)], tmp_path / "trees"
    write_tree(trees / "svhn", "test", random_images(10, seed=2), names)
    tree = datasets.load("svhn", "test", data_dir=trees, source="local").inputs
    write_tree(trees / "svhn", "test", random_images(10, seed=3), names)
    np.testing.assert_array_equal(
        datasets.load("svhn", "test", data_dir=trees, source="local").inputs,
        random_images(10, seed=3))
    write_tree(trees / "svhn", "test", random_images(11, seed=3), names + ["c0"])
    assert len(datasets.load("svhn", "test", data_dir=trees, source="local")) == 11
    # An empty class folder added before the others shifts their labels: read again (and
    # refused here: SVHN has 10 classes).
    (trees / "svhn" / "test" / "a-empty").mkdir()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\), found \[10\]"):
        datasets.load("svhn", "test", data_dir=trees, source="local")
    assert not np.array_equal(tree, random_images(10, seed=3))
    # Only the splits used last stay decoded.
    for n in range(sources.DECODED_SPLITS_KEPT + 1):
        write_chunks(tmp_path / f"more{n}" / "svhn", "test", images[:1], [0])
        datasets.load("svhn", "test", data_dir=tmp_path / f"more{n}", source="local")
    assert len(sources._DECODED) == sources.DECODED_SPLITS_KEPT
    assert str(tmp_path / "more0" / "svhn") not in {folder for folder, _ in sources._DECODED}


def write_tree(folder: Path, split: str, images, class_names):
    from PIL import Image
    for i, (cls, im) in enumerate(zip(class_names, images)):
        d = folder / split / cls
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i}.png")


def test_image_tree_source(tmp_path):
    # SVHN has 10 classes: a folder each; labels are the sorted folder names' indices.
    names = ["cat", "ant", "cat", "bee", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay"]
    write_tree(tmp_path / "svhn", "test", random_images(len(names), seed=1), names)
    ds = datasets.load("svhn", "test", data_dir=tmp_path, source="local")
    assert ds.labels.tolist() == [0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9]  # read class by class
    assert ds.extra["classes"].tolist() == sorted(set(names))


def test_image_tree_missing_a_class_folder_is_refused(tmp_path):
    # Nine folders of ten: every class after the missing one would get its neighbour's label.
    names = [str(d) for d in range(10) if d != 4]
    write_tree(tmp_path / "svhn", "test", random_images(9), names)
    with pytest.raises(ValueError, match=r"9 class folders \(0, 1, 2, 3, 5, .*the data set 10"):
        datasets.load("svhn", "test", data_dir=tmp_path, source="local")


def tiny_imagenet_wnids(seed=0):
    """200 made-up class ids in a shuffled order (the release's wnids.txt is not sorted)."""
    wnids = [f"n{1000000 + 7 * i:08d}" for i in range(200)]
    np.random.default_rng(seed).shuffle(wnids)
    return wnids


def class_image(label, shade=0):
    """A 64x64 image that says its class (and ``shade``) in its pixels."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = label, shade, 255 - label
    return image


def write_tiny_imagenet_release(root: Path, wnids, val_wnids, *, train_per_class=1):
    """The layout of tiny-imagenet-200.zip unzipped (PNG bytes under .JPEG names: Pillow
    reads a file by its content), with its files the loader must ignore."""
    from PIL import Image
    rank = {wnid: i for i, wnid in enumerate(sorted(wnids))}
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (root / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)))
    for wnid in wnids:
        (root / "train" / wnid / "images").mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for k in range(train_per_class):
            Image.fromarray(class_image(rank[wnid], k)).save(
                root / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", format="PNG")
    lines = []
    for i, wnid in enumerate(val_wnids):
        Image.fromarray(class_image(rank[wnid], 200)).save(
            root / "val" / "images" / f"val_{i}.JPEG", format="PNG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    Image.fromarray(class_image(0)).save(root / "test" / "images" / "test_0.JPEG", format="PNG")


def test_tiny_imagenet_release_as_unzipped(tmp_path):
    # The reference reads tiny-imagenet-200/ as it comes and numbers the classes by the
    # sorted wnids; so do we, and a copy stored as chunks with its own (unsorted) wnid order
    # reads the same labels.
    wnids = tiny_imagenet_wnids()
    val_wnids = [wnids[i] for i in (5, 0, 199, 5, 42)]
    write_tiny_imagenet_release(tmp_path / "tiny-imagenet-200", wnids, val_wnids,
                                train_per_class=2)
    train = datasets.load("tiny_imagenet", "train", data_dir=tmp_path)
    assert train.source == str(tmp_path / "tiny-imagenet-200") and len(train) == 400
    assert train.labels.tolist() == [i // 2 for i in range(400)]  # class by class, sorted
    np.testing.assert_array_equal(train.inputs[:, 0, 0, 0], train.labels)  # image says its class
    assert train.extra["wnids"].tolist() == sorted(wnids)
    rank = {wnid: i for i, wnid in enumerate(sorted(wnids))}
    for split in ("val", "test"):  # the release's val split is both (the reference's protocol)
        val = datasets.load("tiny_imagenet", split, data_dir=tmp_path)
        assert val.val_is_test and val.labels.tolist() == [rank[w] for w in val_wnids]
        np.testing.assert_array_equal(val.inputs[:, 0, 0, 0], val.labels)
    chunk_labels = [wnids.index(w) for w in val_wnids]  # the chunk's own order: wnids.txt's
    write_chunks(tmp_path / "chunks" / "tinyimagenet", "val",
                 [class_image(rank[w], 200) for w in val_wnids], chunk_labels, per_chunk=5)
    with np.load(tmp_path / "chunks" / "tinyimagenet" / "tinyimagenet_val_000.npz") as chunk:
        arrays = dict(chunk)
    np.savez(tmp_path / "chunks" / "tinyimagenet" / "tinyimagenet_val_000.npz", **arrays,
             wnids=np.asarray(wnids))
    chunks = datasets.load("tiny_imagenet", "val", data_dir=tmp_path / "chunks")
    assert chunks.labels.tolist() == val.labels.tolist()
    assert chunks.extra["wnids"].tolist() == sorted(wnids)
    # Our folder name is looked for first in each directory.
    write_chunks(tmp_path / "tinyimagenet", "val", [class_image(0)], [0])
    assert len(datasets.load("tiny_imagenet", "val", data_dir=tmp_path)) == 1


@pytest.mark.parametrize("damage, match", [
    ("no images of a class", r"train/n\d+/images holds no images, but wnids.txt lists n\d+: "
                             r"the copy is incomplete"),
    ("unknown wnid", r"val_annotations.txt, line 2, names 'n99999999', which wnids.txt does "
                     r"not list"),
    ("missing image", r"disagree: 1 annotated images are missing \(e.g. val_1.JPEG\)"),
    ("image without annotation", r"disagree: 1 images have no annotation \(e.g. val_9.JPEG\)"),
    ("repeated wnid", r"wnids.txt must list each class id once; n\d+ repeated"),
])
def test_tiny_imagenet_release_incomplete_is_refused(tmp_path, damage, match):
    # An interrupted unzip or an edited file must not train on fewer classes or shifted labels.
    wnids = tiny_imagenet_wnids()
    root = tmp_path / "tiny-imagenet-200"
    write_tiny_imagenet_release(root, wnids, wnids[:3])
    split = "val"
    if damage == "no images of a class":
        split = "train"
        (root / "train" / wnids[7] / "images" / f"{wnids[7]}_0.JPEG").unlink()
    elif damage == "unknown wnid":
        lines = (root / "val" / "val_annotations.txt").read_text().splitlines(keepends=True)
        lines[1] = lines[1].replace(wnids[1], "n99999999")
        (root / "val" / "val_annotations.txt").write_text("".join(lines))
    elif damage == "missing image":
        (root / "val" / "images" / "val_1.JPEG").unlink()
    elif damage == "image without annotation":
        (root / "val" / "images" / "val_9.JPEG").write_bytes(
            (root / "val" / "images" / "val_0.JPEG").read_bytes())
    else:
        (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids + wnids[3:4]))
    with pytest.raises(sources.DamagedDataError, match=match):
        datasets.load("tiny_imagenet", split, data_dir=tmp_path)


@pytest.mark.parametrize("labels, match", [
    ([0, 1, 10], r"labels must be in \[0, 10\), found \[10\] \(1 of 3\)"),  # 1-based
    ([0, 255, 3], r"found \[255\]"),
])
def test_labels_outside_the_classes_are_refused(tmp_path, labels, match):
    write_chunks(tmp_path / "svhn", "test", random_images(3), labels)
    with pytest.raises(ValueError, match=match):
        datasets.load("svhn", "test", data_dir=tmp_path, source="local")


def test_images_of_another_size_are_refused(tmp_path):
    write_chunks(tmp_path / "svhn", "test", random_images(3, size=8), [0, 1, 2])
    with pytest.raises(ValueError, match=r"images must be uint8 \(32, 32, 3\), got uint8 "
                                         r"\(8, 8, 3\)"):
        datasets.load("svhn", "test", data_dir=tmp_path, source="local")


def test_dataset_checks_its_labels():
    images = np.zeros((3, 32, 32, 3), np.uint8)
    ok = datasets.Dataset("mine", "test", images, np.array([0, 1, 1]), 2, "memory")
    assert len(ok) == 3
    with pytest.raises(ValueError, match="labels must be in \\[0, 2\\), found \\[-1\\]"):
        datasets.Dataset("mine", "test", images, np.array([0, -1, 1]), 2, "memory")
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        datasets.Dataset("mine", "test", images, np.array([0, 1]), 2, "memory")
    with pytest.raises(ValueError, match="labels must be integers of shape \\[N\\]"):
        datasets.Dataset("mine", "test", images, np.array([0.0, 1.0, 1.0]), 2, "memory")


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_chunks(tmp_path / "svhn", "test", random_images(2), [0, 1])
    monkeypatch.setenv(sources.ENV_DATA_DIR, str(tmp_path))
    assert len(datasets.load("svhn", "test", source="local")) == 2


def test_missing_data_says_what_to_do(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        datasets.load("cifar100", "test", data_dir=tmp_path, source="local")
    message = str(info.value)
    assert "cifar100/" in message and "CALIB_JAX_DATA_DIR" in message and "TFDS" in message
    with pytest.raises(DataNotFoundError, match=r"<data_dir>/tinyimagenet/ as train_NNN.npz .*"
                                                r"or unzip the release \(http://cs231n.*"
                                                r"<data_dir>/tiny-imagenet-200/wnids.txt, train/, "
                                                r"val/\)\. Details: "):
        datasets.load("tiny_imagenet", "train", data_dir=tmp_path)
    # A data_dir that is no directory is refused, not skipped for the next place to look
    # (which would load the offline copy instead of the user's own, silently).
    write_chunks(tmp_path / "svhn", "test", random_images(2), [0, 1])
    with pytest.raises(DataNotFoundError, match="`data_dir` = .*nowhere: no such directory"):
        datasets.load("svhn", "test", data_dir=tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match="no such directory"):
        datasets.load("svhn", "test", data_dir=tmp_path / "svhn" / "svhn_test_000.npz")
    assert len(datasets.load("svhn", "test", data_dir=tmp_path)) == 2
    with pytest.raises(ValueError, match="`split`"):
        datasets.load("svhn", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown data set"):
        datasets.load("mnist", "test")
    with pytest.raises(ValueError, match="`source`"):
        datasets.load("svhn", "test", source="web")


def test_tfds_source_without_tensorflow(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = datasets.load("svhn", "test", source="tfds")
    assert ds.inputs.shape == (12, 32, 32, 3) and ds.inputs.dtype == np.uint8
    assert ds.labels.shape == (12,) and ds.source == "tfds:svhn_cropped"
    # CIFAR through TFDS: the reference split needs the 50,000 training images. The mock's
    # ids are random text, which gives no original order: kept as stored, with a warning.
    with tfds.testing.mock_data(num_examples=50000, policy=tfds.testing.MockPolicy.USE_CODE), \
            pytest.warns(UserWarning, match="ids .* do not give their original order"):
        train = datasets.load("cifar10", "val", source="tfds")
    assert len(train) == 5000


def test_an_unprepared_tfds_split_raises_without_tfds_warning_above_it(tmp_path, monkeypatch,
                                                                      caplog):
    """TFDS logs a WARNING ("Variant folder ... has no dataset_info.json") before it raises
    for a split that is not prepared: our DataNotFoundError says what is missing and how to
    prepare it, so that record is dropped. A prepared split's records are still logged, and
    so are other threads' records."""
    import logging
    import threading

    tfds = pytest.importorskip("tensorflow_datasets")
    with caplog.at_level(logging.INFO), pytest.raises(sources.DataNotFoundError,
                                                      match="'svhn_cropped' .* not prepared"):
        sources.read_tfds("svhn_cropped", "test", data_dir=str(tmp_path))
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []

    def prepared(*args, **kwargs):
        logging.getLogger("absl").warning("a prepared split's note")
        return [{"image": index_image(3), "label": 3}]

    def unprepared_while_another_thread_logs(*args, **kwargs):
        other = threading.Thread(
            target=lambda: logging.getLogger("absl").warning("another thread's note"))
        other.start()
        other.join()
        raise KeyError("splits is empty")

    monkeypatch.setattr(tfds, "data_source", unprepared_while_another_thread_logs)
    with caplog.at_level(logging.INFO), pytest.raises(sources.DataNotFoundError):
        sources.read_tfds("svhn_cropped", "test")
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == [
        "another thread's note"]  # only this thread's records are held (and dropped)
    caplog.clear()

    monkeypatch.setattr(tfds, "data_source", prepared)
    with caplog.at_level(logging.INFO):
        images, labels = sources.read_tfds("svhn_cropped", "test")
    assert labels.tolist() == [3]
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == [
        "a prepared split's note"]


def index_image(index: int) -> np.ndarray:
    """A CIFAR-sized image whose pixel (0, 0) says ``index`` (red: low byte, green: high)."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[0, 0, :2] = index % 256, index // 256
    return image


def image_index(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)


def test_tfds_cifar_is_put_back_in_the_original_order(monkeypatch):
    # TFDS stores CIFAR shuffled by key hashes; the reference's validation split is indices of
    # the original order, which each example's id keeps ("train_00042").
    tfds = pytest.importorskip("tensorflow_datasets")
    stored = np.random.default_rng(0).permutation(50000)

    class StoredShuffled:
        def __len__(self):
            return 50000

        def __getitem__(self, i):
            j = int(stored[i])
            return {"id": f"train_{j:05d}".encode(), "image": index_image(j), "label": j % 10}

    monkeypatch.setattr(tfds, "data_source", lambda *args, **kwargs: StoredShuffled())
    val = datasets.load("cifar10", "val", source="tfds")
    np.testing.assert_array_equal(image_index(val.inputs), datasets.cifar_split_indices()[1])
    np.testing.assert_array_equal(val.labels, image_index(val.inputs) % 10)
    svhn = datasets.load("svhn", "test", source="tfds")  # no split by index: as stored
    np.testing.assert_array_equal(image_index(svhn.inputs), stored)


def test_original_order_of_ids():
    assert sources.original_order(["test_10", "test_2", "test_0"]).tolist() == [2, 1, 0]
    assert sources.original_order([b"a7", b"a11"]).tolist() == [0, 1]  # numbers, not text
    assert sources.original_order([None, None]).tolist() == [0, 1]  # no ids: as stored
    for ids in (["train_1", "test_0"], ["x_1", "x_1"], ["x_1", "y"]):
        with pytest.warns(UserWarning, match="do not give their original order"):
            assert sources.original_order(ids).tolist() == [0, 1]


class Python2Pickler(pickle._Pickler):
    """Pickles as Python 2 did the CIFAR batches: every str and bytes a Python 2 byte string
    (SHORT_BINSTRING / BINSTRING), which Python 3 reads back as bytes, dtype fields included."""

    def save_py2_string(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, str: save_py2_string, bytes: save_py2_string}


def cifar_python_batch(indices, labels, label_key="labels", **more) -> bytes:
    """A batch file of the CIFAR python release as Python 2 wrote it (protocol 2, byte-string
    keys and fields, NumPy's old module name), of :func:`index_image` images."""
    data = np.stack([index_image(int(i)).transpose(2, 0, 1).reshape(-1) for i in indices])
    out = io.BytesIO()
    batch = {"batch_label": "batch", label_key: [int(y) for y in labels], "data": data,
             "filenames": ["x.png"] * len(data), **more}
    Python2Pickler(out, protocol=2).dump(batch)
    return out.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def test_cifar_python_release_gives_the_reference_split(tmp_path):
    # What torchvision extracts and the reference reads, in the original order: the
    # reference's split indices select the reference's validation images.
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    everything = np.arange(50000)
    for b in range(5):
        part = everything[b * 10000:(b + 1) * 10000]
        (root / f"data_batch_{b + 1}").write_bytes(cifar_python_batch(part, part % 10))
    (root / "test_batch").write_bytes(cifar_python_batch(everything[:7], [3] * 7))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"plane"]}, protocol=2))
    try:
        val = datasets.load("cifar10", "val", data_dir=tmp_path)
        assert val.source == str(root)
        np.testing.assert_array_equal(image_index(val.inputs), datasets.cifar_split_indices()[1])
        np.testing.assert_array_equal(val.labels, image_index(val.inputs) % 10)
        train = datasets.load("cifar10", "train", data_dir=tmp_path)
        np.testing.assert_array_equal(image_index(train.inputs),
                                      datasets.cifar_split_indices()[0])
        test = datasets.load("cifar10", "test", data_dir=tmp_path)
        assert image_index(test.inputs).tolist() == list(range(7)) and set(test.labels) == {3}
        # CIFAR-100: its `meta`, and the 100 fine labels (not the 20 coarse ones).
        root100 = tmp_path / "cifar-100-python"
        root100.mkdir()
        (root100 / "meta").write_bytes(pickle.dumps({b"fine_label_names": []}, protocol=2))
        (root100 / "train").write_bytes(b"")  # never read for the test split
        (root100 / "test").write_bytes(cifar_python_batch(
            range(4), [57, 99, 0, 3], "fine_labels", coarse_labels=[1, 2, 3, 4]))
        assert datasets.load("cifar100", "test", data_dir=tmp_path).labels.tolist() == \
            [57, 99, 0, 3]
        (root / "test_batch").write_bytes(cifar_python_batch(range(7), [3] * 7)[:500])
        with pytest.raises(sources.DamagedDataError, match=r"test_batch cannot be read \("):
            datasets.load("cifar10", "test", data_dir=tmp_path)
    finally:  # 150 MB decoded: not kept in this test process's cache
        sources._DECODED.clear()


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path):
    # A pickle's globals are how it runs code: a batch may build arrays, lists and numbers only.
    ran = tmp_path / "it ran"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch '{ran}'",)

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    (root / "batches.meta").write_bytes(b"")
    (root / "test_batch").write_bytes(pickle.dumps({b"data": RunsCode(), b"labels": [0]},
                                                   protocol=2))
    with pytest.raises(sources.DamagedDataError, match=r"test_batch cannot be read "
                                                       r"\(UnpicklingError: it refers to "
                                                       r"(posix|nt)\.system"):
        datasets.load("cifar10", "test", data_dir=tmp_path)
    assert not ran.exists()


def test_cifar_split_indices_match_reference():
    train, val = datasets.cifar_split_indices()
    assert val[:3].tolist() == [26247, 35067, 34590]  # shared/docs/paper.md
    assert len(train) == 45000 and len(val) == 5000
    assert len(np.intersect1d(train, val)) == 0
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(50000))


def test_normalization_constants():
    assert datasets.normalization("cifar10", "test") == datasets.CIFAR10_MEAN_STD
    assert datasets.normalization("cifar100", "train") == datasets.CIFAR10_MEAN_STD
    # The reference's CIFAR-100 test-set mismatch is the default, behind a switch.
    assert datasets.normalization("cifar100", "test") == datasets.IMAGENET_MEAN_STD
    assert datasets.normalization("cifar100", "test", reference_cifar100_test=False) == \
        datasets.CIFAR10_MEAN_STD
    assert datasets.normalization("tiny_imagenet", "val") == datasets.IMAGENET_MEAN_STD
    with pytest.raises(ValueError):
        datasets.normalization("20news", "test")


def test_gaussian_noise_corruption():
    clean = np.full((200, 32, 32, 3), 128, np.uint8)
    a = datasets.gaussian_noise(clean, severity=5, seed=3)
    np.testing.assert_array_equal(a, datasets.gaussian_noise(clean, severity=5, seed=3))
    assert not np.array_equal(a, datasets.gaussian_noise(clean, severity=5, seed=4))
    noise = a.astype(np.float64) / 255 - 128 / 255
    assert abs(noise.std() - 0.10) < 0.005  # severity 5: sigma = 0.10 (no clipping at mid-grey)
    assert abs(noise.mean() + 0.5 / 255) < 0.002  # truncation to uint8 shifts by half a level
    with pytest.raises(ValueError, match="`severity`"):
        datasets.gaussian_noise(clean, severity=6)


def test_ood_releases_as_they_unpack(tmp_path):
    # SVHN's test_32x32.mat (torchvision's download; digit 0 is labelled 10 there) and
    # CIFAR-10-C's folder as its tar extracts: severity s is rows (s - 1) * 10,000 onwards.
    from scipy import io as scipy_io
    images = random_images(5, seed=4)
    (tmp_path / "svhn").mkdir()
    scipy_io.savemat(tmp_path / "svhn" / "test_32x32.mat", {
        "X": images.transpose(1, 2, 3, 0), "y": np.array([[10], [1], [9], [10], [5]])})
    svhn = datasets.load("svhn", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(svhn.inputs, images)
    assert svhn.labels.tolist() == [0, 1, 9, 0, 5] and svhn.source == str(tmp_path / "svhn")
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, cut short")
    sources._DECODED.clear()
    with pytest.raises(sources.DamagedDataError, match=r"test_32x32.mat cannot be read"):
        datasets.load("svhn", "test", data_dir=tmp_path)
    release = tmp_path / "CIFAR-10-C"
    release.mkdir()
    noisy = np.repeat(np.arange(5, dtype=np.uint8), 10000)[:, None, None, None] * \
        np.ones((1, 32, 32, 3), np.uint8)
    np.save(release / "gaussian_noise.npy", noisy)
    np.save(release / "labels.npy", np.tile(np.arange(10000) % 10, 5).astype(np.uint8))
    for severity in (5, 2):
        corrupted = datasets.load("cifar10_c", "test", data_dir=tmp_path, severity=severity)
        assert corrupted.inputs.shape == (10000, 32, 32, 3) and corrupted.source == str(release)
        assert set(np.unique(corrupted.inputs)) == {severity - 1}
        assert corrupted.labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    np.save(release / "labels.npy", np.zeros(10000, np.uint8))  # one severity's worth
    with pytest.raises(sources.DamagedDataError, match=r"gaussian_noise.npy or labels.npy "
                                                       r"cannot be read .*50,000 labels"):
        datasets.load("cifar10_c", "test", data_dir=tmp_path)


@needs_shared
def test_real_cifar10_splits():
    train = datasets.load("cifar10", "train")
    val = datasets.load("cifar10", "val")
    test = datasets.load("cifar10", "test")
    assert (len(train), len(val), len(test)) == (45000, 5000, 10000)
    assert train.inputs.shape[1:] == (32, 32, 3) and train.inputs.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert np.bincount(np.concatenate([train.labels, val.labels])).tolist() == [5000] * 10
    # Disjoint: no validation image equals a training image (pixel hashes).
    hashes = lambda x: {hash(im.tobytes()) for im in x}  # noqa: E731
    assert not hashes(val.inputs) & hashes(train.inputs[:20000])
    mean = train.inputs.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(mean, datasets.CIFAR10_MEAN_STD[0], atol=0.003)
    corrupted = datasets.load("cifar10_c", "test")
    assert corrupted.extra["generated"] and len(corrupted) == 10000
    np.testing.assert_array_equal(corrupted.labels, test.labels)


@needs_shared
def test_real_tiny_imagenet_and_text(tmp_path):
    tin = datasets.load("tiny_imagenet", "val")
    assert tin.inputs.shape == (10000, 64, 64, 3) and tin.val_is_test and tin.labels.max() == 199
    # The offline chunks store labels in wnids.txt's order; read back as the release would
    # give them (its annotations written from the chunk), the labels agree.
    with np.load(SHARED / "tinyimagenet" / "tin_val_000.npz") as chunk:
        wnids, names, labels = chunk["wnids"].tolist(), chunk["names"].tolist(), chunk["labels"]
        blob, offsets = chunk["blob"], chunk["offsets"]
    release = tmp_path / "tiny-imagenet-200"
    (release / "val" / "images").mkdir(parents=True)
    (release / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (release / "val" / "val_annotations.txt").write_text(
        "".join(f"{name}\t{wnids[label]}\t0\t0\t63\t63\n" for name, label in zip(names, labels)))
    for i, name in enumerate(names):
        (release / "val" / "images" / name).write_bytes(blob[offsets[i]:offsets[i + 1]].tobytes())
    from_release = datasets.load("tiny_imagenet", "val", data_dir=tmp_path)
    order = np.argsort(names)  # the release is read in file-name order, the chunk as stored
    np.testing.assert_array_equal(from_release.labels, tin.labels[:len(names)][order])
    np.testing.assert_array_equal(from_release.inputs, tin.inputs[:len(names)][order])
    news = {s: datasets.load("20news", s) for s in ("train", "val", "test")}
    assert len(news["val"]) == 900
    assert sum(len(d) for d in news.values()) == 11314 + 7532
    assert news["train"].inputs.shape[1] == 1000 and news["train"].inputs.max() < 20000
    sst = {s: datasets.load("sst", s, phrase_labels=True) for s in ("train", "val", "test")}
    assert [len(sst[s]) for s in ("train", "val", "test")] == [6920, 872, 1821]
    # Every real node is labelled; the root (the last real node) carries the sentence label.
    for split in sst.values():
        left, node_labels = split.inputs[:, 1], split.inputs[:, 3]
        assert np.array_equal(left == -2, node_labels == -1)
        root = (left != -2).sum(axis=1) - 1
        roots = node_labels[np.arange(len(split)), root]
        np.testing.assert_array_equal(roots, np.where(split.labels == 1, 2, 0))
    train_nodes = sst["train"].inputs[:, 3]
    assert (train_nodes == 1).sum() > (train_nodes >= 0).sum() / 3  # many neutral phrases


def write_20news(folder: Path, num_posts: int, *, label_shift: int = 0):
    """A generated corpus in the offline copy's format: ``num_posts`` posts of a few words."""
    import gzip
    import json
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "it's", "x11", "space", "god"])
    with gzip.open(folder / "20news_bydate_train_000.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(num_posts):
            text = " ".join(rng.choice(words, rng.integers(1, 12))).title()
            f.write(json.dumps({"id": i, "label": (i + label_shift) % 20, "text": text}) + "\n")


def test_text_sets_are_read_once_for_all_splits_and_again_when_changed(tmp_path, monkeypatch):
    write_20news(tmp_path / "20news", 1200)
    opened = []  # the posts' files opened for reading
    real_open = datasets.gzip.open

    def counting_open(file, mode="rb", **options):
        if "r" in mode:
            opened.append(file)
        return real_open(file, mode, **options)

    monkeypatch.setattr(datasets.gzip, "open", counting_open)
    news = {s: datasets.load("20news", s, data_dir=tmp_path, max_len=6)
            for s in ("train", "val", "test")}
    assert len(opened) == 1  # the second and third split come from the first's reading
    assert [len(news[s]) for s in ("train", "val", "test")] == [60, 900, 240]
    assert news["train"].inputs.shape == (60, 6) and not news["val"].inputs.flags.writeable
    # The reference's split: seed-1 shuffle, the last 20 % test, 900 before it val.
    order = np.arange(1200)
    np.random.RandomState(1).shuffle(order)
    np.testing.assert_array_equal(news["test"].labels, order[-240:] % 20)
    np.testing.assert_array_equal(news["val"].labels, order[60:960] % 20)
    # Ids: 0 padding (left), then words by frequency in all posts (the reference's Keras
    # tokenizer is fitted before the split).
    vocab = dict(news["train"].extra["vocab"])
    assert sorted(vocab.values()) == list(range(1, 9)) and "it's" in vocab
    news["train"].extra["vocab"]["alpha"] = -1  # a user's edit stays in that Dataset
    assert datasets.load("20news", "train", data_dir=tmp_path, max_len=6).extra["vocab"] == vocab
    # Another max_len is another encoding; a rewritten file is read again.
    assert datasets.load("20news", "val", data_dir=tmp_path, max_len=3).inputs.shape == (900, 3)
    assert len(opened) == 2
    write_20news(tmp_path / "20news", 1200, label_shift=1)
    shifted = datasets.load("20news", "test", data_dir=tmp_path, max_len=6)
    assert len(opened) == 3
    np.testing.assert_array_equal(shifted.labels, (order[-240:] + 1) % 20)


def test_20news_is_encoded_as_the_reference_encodes_it():
    # NewsGroup/ng_loader.py: the header goes (up to the first blank line), Keras's
    # Tokenizer(num_words) and pad_sequences(maxlen) do the rest.
    post = "From: someone@cmu.edu\nSubject: Re: X\n\nIt's the X11 R5-patch (again)... Don't!"
    assert datasets._without_header(post).startswith("\n\nIt's")
    assert datasets._without_header("\n\nno header, a blank first line") == \
        "\n\nno header, a blank first line"  # the reference strips only after a header
    assert datasets._keras_words(datasets._without_header(post)) == \
        ["it's", "the", "x11", "r5", "patch", "again", "don't"]
    vocab = datasets._build_vocab([["b", "a", "c"], ["c", "a", "d"], ["e"]], 4, reserved=1,
                                  ties="first")
    assert vocab == {"a": 1, "c": 2, "b": 3}  # by count, ties by first appearance; 3 words
    assert datasets._encode([5, 6, 7], 5).tolist() == [0, 0, 5, 6, 7]  # padded at the front
    assert datasets._encode([1, 2, 3, 4, 5, 6], 4).tolist() == [3, 4, 5, 6]  # keeps the end
    assert datasets._encode([], 3).tolist() == [0, 0, 0]


def write_20news_tree(root: Path, texts, labels):
    """The reference's 20_newsgroup/ layout (news20.tar.gz): a folder per group, a file per
    post named by a number, latin-1."""
    for i, (text, label) in enumerate(zip(texts, labels)):
        group = root / f"group.{label:02d}"
        group.mkdir(parents=True, exist_ok=True)
        (group / str(50000 + i)).write_bytes(text.encode("latin-1"))


def test_20news_from_the_reference_folder_and_ours_alike(tmp_path):
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "café", "x11", "space", "god", "ax"]
    texts = [f"From: user{i}@host\nLines: {i}\n\n" +
             " ".join(rng.choice(words, rng.integers(1, 30))) for i in range(1200)]
    labels = [i % 20 for i in range(1200)]
    order = sorted(range(1200), key=lambda i: (labels[i], str(50000 + i)))  # as read
    write_20news_tree(tmp_path / "tree" / "20_newsgroup", texts, labels)
    (tmp_path / "tree" / "20_newsgroup" / "group.00" / "README").write_text("not a post")
    (tmp_path / "jsonl" / "20news").mkdir(parents=True)
    import gzip
    import json
    with gzip.open(tmp_path / "jsonl" / "20news" / "20news_bydate_train_000.jsonl.gz", "wt",
                   encoding="utf-8") as f:
        for i in order:
            f.write(json.dumps({"id": i, "label": labels[i], "text": texts[i]}) + "\n")
    for root in ("tree", "jsonl"):
        news = {s: datasets.load("20news", s, data_dir=tmp_path / root, max_len=25)
                for s in ("train", "val", "test")}
        vocab = news["train"].extra["vocab"]
        assert not {"from", "lines", "host"} & vocab.keys() and "café" in vocab  # no headers
        shuffled = np.arange(1200)
        np.random.RandomState(1).shuffle(shuffled)
        test_posts = [order[i] for i in shuffled[-240:]]
        assert news["test"].labels.tolist() == [labels[i] for i in test_posts]
        want = [vocab[w] for w in texts[test_posts[0]].split("\n\n")[1].split(" ")][-25:]
        assert news["test"].inputs[0].tolist() == [0] * (25 - len(want)) + want
        if root == "tree":
            tree_news = news
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(tree_news[s].inputs, news[s].inputs)
        np.testing.assert_array_equal(tree_news[s].labels, news[s].labels)
    # The clean option: the vocabulary of the training posts alone; a bad value is refused.
    train_only = datasets.load("20news", "train", data_dir=tmp_path / "jsonl", max_len=25,
                               vocabulary="train")
    assert set(train_only.extra["vocab"]) <= set(vocab)
    with pytest.raises(ValueError, match="`vocabulary` must be 'all'"):
        datasets.load("20news", "train", data_dir=tmp_path / "jsonl", vocabulary="test")
    (tmp_path / "tree" / "20_newsgroup" / "group.19").rename(tmp_path / "group.19")
    with pytest.raises(sources.DamagedDataError, match="a folder for each of the 20 newsgroups, "
                                                       "got 19"):
        datasets.load("20news", "train", data_dir=tmp_path / "tree")


def test_word_vectors_follow_the_vocabulary(tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("the 1 2 3\ncafé -1 0.5 0\nunused 9 9 9\n", encoding="utf-8")
    table = datasets.word_vectors({"café": 3, "the": 1, "missing": 2}, glove, vocab_size=5)
    np.testing.assert_array_equal(table, [[0, 0, 0], [1, 2, 3], [0, 0, 0], [-1, 0.5, 0],
                                          [0, 0, 0]])
    assert table.dtype == np.float32
    with pytest.raises(ValueError, match="ids up to 7, beyond `vocab_size` = 5"):
        datasets.word_vectors({"the": 7}, glove, vocab_size=5)
    glove.write_text("the 1 2 3\ncafé -1 0.5\n", encoding="utf-8")
    with pytest.raises(sources.DamagedDataError, match="line 2 holds 2 numbers, the first line 3"):
        datasets.word_vectors({"café": 1}, glove, vocab_size=2)


def test_text_sets_too_small_or_incomplete_are_refused(tmp_path):
    write_20news(tmp_path / "20news", 1000)  # 200 test + 900 val leave no training post
    with pytest.raises(DataNotFoundError, match="1000 posts: too few"):
        datasets.load("20news", "train", data_dir=tmp_path)
    (tmp_path / "20news" / "20news_bydate_train_000.jsonl.gz").unlink()
    with pytest.raises(DataNotFoundError, match="20 Newsgroups not found in .*20news"):
        datasets.load("20news", "val", data_dir=tmp_path)
    (tmp_path / "sst").mkdir()
    (tmp_path / "sst" / "train.txt").write_text("(3 (2 a) (4 (2 b) (3 b)))\n")
    (tmp_path / "sst" / "test.txt").write_text("(3 (2 a) (4 b))\n")
    with pytest.raises(DataNotFoundError, match=r"no \['dev.txt'\] in .*sst"):
        datasets.load("sst", "train", data_dir=tmp_path)
    (tmp_path / "sst" / "dev.txt").write_text("(1 (2 a) (0 c))\n(2 (2 a) (2 b))\n")
    val = datasets.load("sst", "val", data_dir=tmp_path)
    assert len(val) == 1 and val.labels.tolist() == [0]  # the neutral root is dropped
    # By default every split is padded to the largest tree of the three files.
    # The vocabulary of all three files (the reference's), or of the training file alone.
    assert val.extra["max_nodes"] == 5 and val.extra["vocab"] == {"a": 1, "b": 2, "c": 3}
    assert val.inputs.shape == (1, 3, 5) and 3 in val.inputs[0, 0].tolist()  # "c" is known
    train_only = datasets.load("sst", "val", data_dir=tmp_path, vocabulary="train")
    assert train_only.extra["vocab"] == {"b": 1, "a": 2} and 3 not in train_only.inputs[0, 0]
    with pytest.raises(ValueError, match="`vocabulary` must be 'all'"):
        datasets.load("sst", "val", data_dir=tmp_path, vocabulary="dev")
    # An explicit max_nodes need only fit the split asked for.
    assert datasets.load("sst", "val", data_dir=tmp_path, max_nodes=3).inputs.shape == (1, 3, 3)
    with pytest.raises(ValueError, match="more than max_nodes=3"):
        datasets.load("sst", "train", data_dir=tmp_path, max_nodes=3)
    # Phrase labels: every node's class (0-1 negative, 2 neutral, 3-4 positive) as a fourth
    # row, in post-order (a, c, root), -1 on padding; the root's is the sentence's label.
    phrases = datasets.load("sst", "val", data_dir=tmp_path, phrase_labels=True)
    assert phrases.inputs.shape == (1, 4, 5)
    np.testing.assert_array_equal(phrases.inputs[:, :3], val.inputs)
    assert phrases.inputs[0, 3].tolist() == [1, 0, 0, -1, -1]
    train_phrases = datasets.load("sst", "train", data_dir=tmp_path, phrase_labels=True)
    assert train_phrases.inputs[0, 3].tolist() == [1, 1, 2, 2, 2]  # a, b, b, (b b), root
    assert train_phrases.labels.tolist() == [1]
    with pytest.raises(ValueError, match="`phrase_labels` must be True or False"):
        datasets.load("sst", "val", data_dir=tmp_path, phrase_labels=1)


def test_a_damaged_data_file_is_named_and_never_skipped_for_another_source(tmp_path,
                                                                          monkeypatch):
    """A chunk, image or text file that cannot be read raises DamagedDataError naming it.
    It is not a DataNotFoundError: the search must not fall through to TFDS or to another
    directory holding the same data set (the run would use other data than the user's)."""
    assert not issubclass(sources.DamagedDataError, DataNotFoundError)
    tfds_asked = []
    monkeypatch.setattr(sources, "read_tfds", lambda *a, **k: tfds_asked.append(a))
    images, labels = random_images(6), np.arange(6) % 3
    for case in ("truncated", "bit-flipped", "bad image"):
        folder = tmp_path / case / "svhn"
        write_chunks(folder, "test", images, labels)
        chunk = folder / "svhn_test_001.npz"
        data = bytearray(chunk.read_bytes())
        if case == "truncated":
            data = data[:len(data) // 2]
        elif case == "bit-flipped":  # inside the stored blob: the zip's CRC no longer holds
            data[len(data) // 3:len(data) // 3 + 64] = b"\0" * 64
        chunk.write_bytes(bytes(data))
        if case == "bad image":
            with np.load(folder / "svhn_test_000.npz") as good:
                arrays = dict(good)
            arrays["blob"] = arrays["blob"].copy()
            arrays["blob"][arrays["offsets"][1]:arrays["offsets"][1] + 40] = 7  # image 1.png
            np.savez(folder / "svhn_test_000.npz", **arrays)
            expected = r"svhn_test_000.npz: image 1.png cannot be decoded"
        else:
            expected = r"svhn_test_001.npz cannot be read \((BadZipFile|EOFError|ValueError)"
        with pytest.raises(sources.DamagedDataError, match=expected + r".*download it again"):
            datasets.load("svhn", "test", data_dir=tmp_path / case)
    assert tfds_asked == []
    write_tree(tmp_path / "tree" / "svhn", "test", random_images(10, seed=2),
               [f"c{i}" for i in range(10)])
    (tmp_path / "tree" / "svhn" / "test" / "c3" / "3.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(sources.DamagedDataError, match=r"image .*c3/3.png cannot be decoded"):
        datasets.load("svhn", "test", data_dir=tmp_path / "tree")
    write_20news(tmp_path / "text" / "20news", 1200)
    posts = tmp_path / "text" / "20news" / "20news_bydate_train_000.jsonl.gz"
    posts.write_bytes(posts.read_bytes()[:200])
    with pytest.raises(sources.DamagedDataError, match=r"20news_bydate_train_000.jsonl.gz "
                                                       r"cannot be read \(EOFError"):
        datasets.load("20news", "train", data_dir=tmp_path / "text")
    (tmp_path / "text" / "sst").mkdir()
    for name in ("train.txt", "dev.txt"):
        (tmp_path / "text" / "sst" / name).write_text("(3 (2 a) (4 (2 b) (3 b)))\n")
    (tmp_path / "text" / "sst" / "test.txt").write_text("(3 (2 a) (4 b))\n\n(3 (2 a) (4 b\n")
    with pytest.raises(sources.DamagedDataError, match=r"test.txt, line 3 cannot be read"):
        datasets.load("sst", "val", data_dir=tmp_path / "text")
