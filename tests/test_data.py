"""Tests for gsg_jax/data.py: IDX parsing, the pipeline under tfds.testing.mock_data, real files."""

import gzip
import os
import socket

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from gsg_jax import data

REAL_IDX_DIR = "/usr/share/datasets/fashion-mnist"
NUM_MOCK = 50  # records per split under mock_data


def write_idx(path, array):
    """Writes `array` (uint8) as an IDX file, gzipped if path ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def write_fake_fashion_mnist(idx_dir, n=4):
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        write_idx(
            os.path.join(idx_dir, f"{split}-images-idx3-ubyte.gz"),
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        )
        write_idx(
            os.path.join(idx_dir, f"{split}-labels-idx1-ubyte"),  # plain, not gzipped
            rng.integers(0, 10, (n,), dtype=np.uint8),
        )


def config(idx_dir, data_dir):
    cfg = data.default_data_config()
    cfg.idx_dir = str(idx_dir)
    cfg.data_dir = str(data_dir)
    return cfg


def fake_processes(monkeypatch, index, count):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)


# --- IDX files ------------------------------------------------------------------------------------


def test_read_idx_gzip_and_plain(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "x.gz", images)
    write_idx(tmp_path / "x", images)
    for name in ("x.gz", "x"):
        got = data.read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (3, 4, 5)
        np.testing.assert_array_equal(got, images)
    # Multi-byte values are big-endian.
    with open(tmp_path / "i32", "wb") as f:
        f.write(
            bytes([0, 0, 0x0C, 1])
            + np.asarray([2], ">u4").tobytes()
            + np.asarray([1, -70000], ">i4").tobytes()
        )
    np.testing.assert_array_equal(data.read_idx(tmp_path / "i32"), [1, -70000])
    (tmp_path / "bad").write_bytes(b"\x1f\x8b\x08\x00junk")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad")


def test_find_idx_files(tmp_path):
    assert data.find_idx_files(None) is None
    assert data.find_idx_files(tmp_path) is None
    write_fake_fashion_mnist(tmp_path)
    files = data.find_idx_files(tmp_path)
    assert files["train"] == (
        str(tmp_path / "train-images-idx3-ubyte.gz"),
        str(tmp_path / "train-labels-idx1-ubyte"),
    )
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    assert data.find_idx_files(tmp_path) is None


def test_default_data_config():
    cfg = data.default_data_config()
    assert cfg.name == "fashion_mnist" and cfg.idx_dir == REAL_IDX_DIR and cfg.data_dir is None
    assert cfg.train_split is None
    cfg.data_dir = "/some/dir"  # str placeholders: overridable from the command line
    cfg.train_split = "train+unlabelled"
    assert data.DATASETS["fashion_mnist"] == data.DatasetSpec((28, 28, 1), 10, "train", "test")


# --- The pipeline under tfds.testing.mock_data ----------------------------------------------------


@pytest.fixture
def mock_cfg(tmp_path):
    """Config with no IDX files (so TFDS's fashion_mnist is used) and random records for it."""
    (tmp_path / "empty").mkdir()
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        yield config(tmp_path / "empty", tmp_path / "tfds")


def image_ids(source):
    """Maps each record's image bytes to its index (mock images are random, so unique)."""
    ids = {np.asarray(source[i]["image"]).tobytes(): i for i in range(len(source))}
    assert len(ids) == len(source)
    return ids


def ids_of(batch, ids, mask=None):
    images = batch["image"] if mask is None else batch["image"][mask]
    return [ids[img.tobytes()] for img in images]


def test_source_records_are_normalised(mock_cfg):
    source = data.get_source(mock_cfg, "train")
    assert "name=fashion_mnist," in repr(source) and len(source) == NUM_MOCK
    for record in [source[7]] + list(source.__getitems__([0, 49])):
        assert record["image"].shape == (28, 28, 1) and record["image"].dtype == np.uint8
        assert type(record["label"]) is int and 0 <= record["label"] < 10


def test_train_iterator_batches(mock_cfg):
    it = data.train_iterator(mock_cfg, global_batch_size=16, seed=0)
    batches = [next(it) for _ in range(7)]  # > 2 epochs of 50: the iterator is infinite
    for b in batches:
        assert set(b) == {"image", "label"}
        assert b["image"].shape == (16, 28, 28, 1) and b["image"].dtype == np.uint8
        assert b["label"].shape == (16,) and b["label"].dtype == np.int32
        assert ((0 <= b["label"]) & (b["label"] < 10)).all()
    ids = image_ids(data.get_source(mock_cfg, "train"))
    order = [i for b in batches for i in ids_of(b, ids)]
    epoch0, epoch1 = order[:NUM_MOCK], order[NUM_MOCK : 2 * NUM_MOCK]
    assert sorted(epoch0) == sorted(epoch1) == list(range(NUM_MOCK))  # each epoch: all, once
    assert epoch0 != epoch1 and epoch0 != sorted(epoch0)  # shuffled, differently each epoch
    # Same seed, same order; another seed, another order.
    assert np.array_equal(next(data.train_iterator(mock_cfg, 16, 0))["image"], batches[0]["image"])
    assert not np.array_equal(next(data.train_iterator(mock_cfg, 16, 1))["image"], batches[0]["image"])


def test_train_iterator_idx_builder(tmp_path):
    """With IDX files present the project's own builder serves the records (mocked here)."""
    write_fake_fashion_mnist(tmp_path)
    cfg = config(tmp_path, tmp_path / "tfds")
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        source = data.get_source(cfg, "test")
        assert "fashion_mnist_idx" in repr(source) and len(source) == NUM_MOCK
        record = source[3]
        assert record["image"].shape == (28, 28, 1) and record["image"].dtype == np.uint8
        assert isinstance(record["label"], int)
        b = next(data.train_iterator(cfg, 8, seed=0))
        assert b["image"].shape == (8, 28, 28, 1) and b["image"].dtype == np.uint8
        assert b["label"].shape == (8,) and b["label"].dtype == np.int32


def test_train_iterator_state_round_trip(mock_cfg):
    it = data.train_iterator(mock_cfg, 16, seed=3)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    restored = data.train_iterator(mock_cfg, 16, seed=3)
    restored.set_state(state)
    for w, g in zip(want, [next(restored) for _ in range(2)]):
        np.testing.assert_array_equal(w["image"], g["image"])
        np.testing.assert_array_equal(w["label"], g["label"])


def test_train_iterator_orbax_round_trip(mock_cfg, tmp_path):
    grain = pytest.importorskip("grain")
    ocp = pytest.importorskip("orbax.checkpoint")
    it = data.train_iterator(mock_cfg, 16, seed=0)
    for _ in range(4):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    want = next(it)
    restored = data.train_iterator(mock_cfg, 16, seed=0)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    np.testing.assert_array_equal(next(restored)["image"], want["image"])


def test_train_shards_are_disjoint(mock_cfg, monkeypatch):
    ids = image_ids(data.get_source(mock_cfg, "train"))
    seen = []
    for p in range(2):
        fake_processes(monkeypatch, p, 2)
        it = data.train_iterator(mock_cfg, global_batch_size=16, seed=0)
        first_epoch = [i for _ in range(3) for i in ids_of(next(it), ids)]  # 3 x 8 of 25 records
        assert len(set(first_epoch)) == 24
        assert all(i % 2 == p for i in first_epoch)  # process p reads rows p::2
        seen.append(set(first_epoch))
    assert not seen[0] & seen[1]


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_split_once(mock_cfg, monkeypatch, process_count):
    source = data.get_source(mock_cfg, "test")
    ids = image_ids(source)
    per_process = []
    for p in range(process_count):
        fake_processes(monkeypatch, p, process_count)
        per_process.append(list(data.eval_batches(source, global_batch_size=16)))
    assert [len(b) for b in per_process] == [4] * process_count  # ceil(50 / 16) everywhere
    local = 16 // process_count
    order = []
    for step in range(4):
        for p in range(process_count):
            b = per_process[p][step]
            assert b["image"].shape == (local, 28, 28, 1) and b["image"].dtype == np.uint8
            assert b["label"].shape == (local,) and b["label"].dtype == np.int32
            assert b["mask"].shape == (local,) and b["mask"].dtype == np.bool_
            assert not b["image"][~b["mask"]].any() and not b["label"][~b["mask"]].any()
            order += ids_of(b, ids, b["mask"])
    assert order == list(range(NUM_MOCK))  # in order, each exactly once


def test_batch_size_must_divide_by_processes(mock_cfg, monkeypatch):
    fake_processes(monkeypatch, 0, 3)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        data.train_iterator(mock_cfg, 16, seed=0)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        next(data.eval_batches(data.get_source(mock_cfg, "test"), 16))


def test_unknown_dataset_name(mock_cfg):
    mock_cfg.name = "imagenet_typo"
    with pytest.raises(ValueError, match=r"Unknown dataset 'imagenet_typo'.*fashion_mnist"):
        data.get_source(mock_cfg, "train")
    with pytest.raises(ValueError, match="Unknown dataset"):
        data.train_iterator(mock_cfg, 16, seed=0)


def test_missing_files_error(tmp_path, monkeypatch):
    """No IDX files, nothing prepared, no network: one clear error, at once (TFDS alone would retry
    its downloads for minutes)."""
    (tmp_path / "empty").mkdir()

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(FileNotFoundError) as e:
        data.get_source(config(tmp_path / "empty", tmp_path / "tfds"), "train")
    message = str(e.value)
    assert message.startswith("Fashion-MNIST not found")
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--config.data.idx_dir" in message and "network is unreachable" in message


# --- Other TFDS datasets under tfds.testing.mock_data ---------------------------------------------

CROP = data.HostCrop(image_size=16, num_crops=4, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))


@pytest.fixture
def named_cfg(tmp_path):
    """Config for dataset `name`, its records served at random by mock_data."""

    def make(name):
        cfg = config(tmp_path / "empty", tmp_path / "tfds")
        cfg.name = name
        return cfg

    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        yield make


def assert_labels(batch, name):
    assert batch["label"].shape == (len(batch["label"]),) and batch["label"].dtype == np.int32
    assert ((0 <= batch["label"]) & (batch["label"] < data.DATASETS[name].num_classes)).all()


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_fixed_size_datasets(named_cfg, name):
    cfg, spec = named_cfg(name), data.DATASETS[name]
    batches = [next(data.train_iterator(cfg, 16, seed=0)) for _ in range(2)]
    for b in batches:
        assert set(b) == {"image", "label"}
        assert b["image"].shape == (16, *spec.image_shape) and b["image"].dtype == np.uint8
        assert_labels(b, name)
    np.testing.assert_array_equal(batches[0]["image"], batches[1]["image"])  # same seed, same batch
    b = next(data.eval_batches(data.get_source(cfg, spec.eval_split), 16))
    assert b["image"].shape == (16, *spec.image_shape) and b["mask"].all()
    assert_labels(b, name)


def test_train_split_override(named_cfg, monkeypatch):
    """STL-10 pretraining on its labelled and unlabelled images; the kNN bank keeps `train`."""
    cfg = named_cfg("stl10")
    splits = []
    get_source = data.get_source
    monkeypatch.setattr(data, "get_source", lambda c, split: splits.append(split) or get_source(c, split))
    next(data.train_iterator(cfg, 8, seed=0))
    cfg.train_split = "train+unlabelled"
    next(data.train_iterator(cfg, 8, seed=0))
    assert splits == ["train", "train+unlabelled"]


def test_imagenet_host_crops(named_cfg):
    """Variable-size records (mock sizes 5-49 px) become num_crops crops each, taken on the host."""
    cfg = named_cfg("imagenet2012")
    it = data.train_iterator(cfg, 8, seed=0, crop=CROP)
    first = [next(it) for _ in range(3)]
    for b in first:
        assert set(b) == {"views", "label"}
        assert b["views"].shape == (8, 4, 16, 16, 3) and b["views"].dtype == np.uint8
        assert_labels(b, "imagenet2012")
    views = first[0]["views"]
    assert all(not np.array_equal(views[:, 0], views[:, k]) for k in range(1, 4))  # independent crops
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    # Same seed: the same crops, from the start or from a saved state; another seed: other crops.
    again = data.train_iterator(cfg, 8, seed=0, crop=CROP)
    np.testing.assert_array_equal(next(again)["views"], views)
    again.set_state(state)
    for w, g in zip(want, [next(again) for _ in range(2)]):
        np.testing.assert_array_equal(w["views"], g["views"])
        np.testing.assert_array_equal(w["label"], g["label"])
    assert not np.array_equal(next(data.train_iterator(cfg, 8, seed=1, crop=CROP))["views"], views)
    # Eval: resized and centre-cropped on the host, the fixed-size padding and masking contract.
    batches = list(data.eval_batches(data.get_source(cfg, "validation"), 16, center_crop=16))
    assert len(batches) == 4 and [b["mask"].sum() for b in batches] == [16, 16, 16, 2]
    for b in batches:
        assert b["image"].shape == (16, 16, 16, 3) and b["image"].dtype == np.uint8
        assert not b["image"][~b["mask"]].any()


def test_host_crop_only_for_variable_size(named_cfg):
    with pytest.raises(ValueError, match="crop=HostCrop"):
        data.train_iterator(named_cfg("imagenet2012"), 8, seed=0)
    with pytest.raises(ValueError, match="crop=HostCrop"):
        data.train_iterator(named_cfg("cifar10"), 8, seed=0, crop=CROP)


def test_missing_prepared_dataset_error(tmp_path):
    cfg = config(tmp_path / "empty", tmp_path / "tfds")
    cfg.name = "imagenet2012"
    with pytest.raises(FileNotFoundError) as e:
        data.get_source(cfg, "validation")
    message = str(e.value)
    assert message.startswith("TFDS dataset 'imagenet2012' (split 'validation') not found as array_record")
    assert str(tmp_path / "tfds") in message and "--config.data.data_dir=DIR" in message
    assert "tfds build imagenet2012 --file_format=array_record --data_dir=DIR --manual_dir=" in message


# --- Host crops ------------------------------------------------------------------------------------


def test_crop_window_torchvision_semantics():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = data.crop_window(rng, 40, 60, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top <= 40 - h and 0 <= left <= 60 - w
        assert 0.2 * 2400 * 0.9 <= h * w <= 2400 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1  # up to rounding
    # No draw fits a 10 x 1000 strip: the centred fallback, its ratio clamped to 4/3.
    assert data.crop_window(rng, 10, 1000, (0.9, 1.0), (3 / 4, 4 / 3)) == (0, 493, 10, 13)
    assert data.crop_window(rng, 1000, 10, (0.9, 1.0), (3 / 4, 4 / 3)) == (493, 0, 13, 10)


def test_random_resized_crops_and_center_crop():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    whole = data.HostCrop(image_size=8, num_crops=2, scale=(1.0, 1.0), ratio=(1.5, 1.5))
    views = data.random_resized_crops(image, rng, whole)  # the whole image, resized to 8 x 8
    expected = np.asarray(Image.fromarray(image).resize((8, 8), Image.Resampling.BILINEAR))
    assert views.shape == (2, 8, 8, 3) and views.dtype == np.uint8
    np.testing.assert_array_equal(views, np.stack([expected, expected]))
    # Shorter side already round(7 / 0.875) = 8: no resize, only the centre crop (left = round(2.5)).
    np.testing.assert_array_equal(data.resize_center_crop(image, 7), image[0:7, 2:9])
    np.testing.assert_array_equal(data.resize_center_crop(image[..., :1], 7), image[0:7, 2:9, :1])
    assert data.resize_center_crop(image.transpose(1, 0, 2), 16).shape == (16, 16, 3)


# --- The real files (Debian's dataset-fashion-mnist) ----------------------------------------------

needs_real_files = pytest.mark.skipif(
    data.find_idx_files(REAL_IDX_DIR) is None,
    reason=f"Fashion-MNIST IDX files not in {REAL_IDX_DIR} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="session")
def real_cfg(tmp_path_factory):
    """Prepared once per test session (~10-20 s) into a temporary TFDS data dir."""
    return config(REAL_IDX_DIR, tmp_path_factory.mktemp("tfds"))


@needs_real_files
def test_real_builder(real_cfg):
    train = data.get_source(real_cfg, "train")
    test = data.get_source(real_cfg, "test")
    assert (len(train), len(test)) == (60_000, 10_000)
    # Records keep the IDX files' order.
    first = data.read_idx(os.path.join(REAL_IDX_DIR, "train-images-idx3-ubyte.gz"))[0]
    np.testing.assert_array_equal(train[0]["image"][..., 0], first)
    labels = data.read_idx(os.path.join(REAL_IDX_DIR, "t10k-labels-idx1-ubyte.gz"))
    batches = list(data.eval_batches(test, 1000))
    assert len(batches) == 10 and all(b["mask"].all() for b in batches)
    got = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(got, labels)
    assert ((0 <= got) & (got < 10)).all() and np.bincount(got).tolist() == [1000] * 10
    images = np.concatenate([b["image"] for b in batches])
    assert images.dtype == np.uint8 and images.shape == (10_000, 28, 28, 1)
    assert images.std() > 0 and len(np.unique(images[:100].reshape(100, -1), axis=0)) == 100


@needs_real_files
def test_real_train_iterator(real_cfg):
    b = next(data.train_iterator(real_cfg, 256, seed=0))
    assert b["image"].shape == (256, 28, 28, 1) and b["image"].dtype == np.uint8
    assert b["label"].dtype == np.int32 and len(np.unique(b["label"])) > 5
