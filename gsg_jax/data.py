"""Image input pipeline for the self-supervised side: TFDS random-access sources read through grain.

No TensorFlow is needed anywhere here. Fashion-MNIST sources, in order of preference (see `get_source`):
  1. IDX files on disk (Debian's `dataset-fashion-mnist`, or `data.idx_dir`), turned once into an
     array_record TFDS dataset by this module's own builder `fashion_mnist_idx`. TFDS's own
     `fashion_mnist` can't be used with those files: Debian's gzip files differ byte-wise from the
     ones TFDS checksums, and its `Image` feature needs TensorFlow to encode.
  2. TFDS's own `fashion_mnist` (already prepared in `data_dir`, or downloaded given network).
cifar10, cifar100, stl10 and imagenet2012 must already be prepared as array_record in `data_dir`
(preparing them needs TensorFlow); TFDS decodes their PNG/JPEG images with Pillow.

All sources give records {'image': uint8 [H, W, C], 'label': int}; batches come out as numpy arrays,
process-local (each JAX process reads only its shard). Fixed-size images are cropped and augmented
later, on the device. Variable-size images (imagenet2012) can't be stacked into a batch as stored:
the pipeline decodes them and takes random-resized crops on the host (`HostCrop`), per record,
with randomness drawn from the seed and the record's position in the stream, so it is reproducible
and the iterator's state stays a position.

Under `tfds.testing.mock_data` every builder serves random records of the right shape (random sizes
for imagenet2012), so the whole pipeline runs in tests with no files and no network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import gzip
import math
import os
import socket
import unittest.mock
import urllib.parse
from typing import Any, Iterator

from absl import logging
import grain
import jax
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants
from tensorflow_datasets.proto import tf_example_pb2


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    image_shape: tuple[int, int, int] | None  # H, W, C of the stored images; None: sizes vary
    num_classes: int
    train_split: str  # labelled: the kNN bank and the default pretraining split
    eval_split: str


DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec((28, 28, 1), 10, "train", "test"),
    "cifar10": DatasetSpec((32, 32, 3), 10, "train", "test"),
    "cifar100": DatasetSpec((32, 32, 3), 100, "train", "test"),
    # Pretraining may add the 100,000 unlabelled images: config data.train_split="train+unlabelled".
    "stl10": DatasetSpec((96, 96, 3), 10, "train", "test"),
    "imagenet2012": DatasetSpec(None, 1000, "train", "validation"),
}


@dataclasses.dataclass(frozen=True)
class HostCrop:
    """torchvision RandomResizedCrop taken on the host, for datasets of variable-size images:
    `num_crops` independent crops per example, each resized (bilinear) to image_size x image_size."""

    image_size: int
    num_crops: int
    scale: tuple[float, float]  # area fraction of the crop
    ratio: tuple[float, float]  # aspect ratio w/h, sampled log-uniformly


EVAL_CROP_FRACTION = 0.875  # eval: shorter side resized to size / 0.875, then the centre crop
_CROP_TRIES = 10  # as torchvision: then fall back to a centre crop
# Host crops decode JPEGs (Pillow releases the GIL): as many reader threads as grain's default.
_HOST_CROP_THREADS = 16

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"

# IDX file stems per split; each may be stored gzipped (Debian) or plain.
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_NOT_FOUND_MSG = (
    "Fashion-MNIST not found: install Debian's dataset-fashion-mnist "
    "(sudo apt-get install dataset-fashion-mnist) or set --config.data.idx_dir=DIR with the four "
    "IDX files ({files})."
)


def default_data_config() -> ml_collections.ConfigDict:
    """The `config.data` block: which dataset, and where its files are."""
    return ml_collections.ConfigDict(
        {
            "name": "fashion_mnist",
            # Directory with the four Fashion-MNIST IDX files (gzip or plain); None: don't look for them.
            "idx_dir": DEFAULT_IDX_DIR,
            # TFDS data dir, where prepared datasets live; None: TFDS's default (~/tensorflow_datasets).
            "data_dir": ml_collections.config_dict.placeholder(str),
            # TFDS split for pretraining, e.g. "train+unlabelled" for stl10; None: the dataset's train split.
            "train_split": ml_collections.config_dict.placeholder(str),
        }
    )


# ------------------------------------------------------------------------------------------------
# IDX files and the TFDS builder that turns them into an array_record dataset.
# ------------------------------------------------------------------------------------------------

# IDX type codes (third header byte) to numpy dtypes; multi-byte values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads an IDX file (gzipped if its name ends in .gz) into a numpy array of its stored shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    # Header: two zero bytes, a type code, the number of dims, then each dim as a big-endian uint32.
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r}).")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    array = np.frombuffer(data, dtype, count=math.prod(shape), offset=4 + 4 * ndim)
    return array.reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_files(idx_dir: str | os.PathLike[str] | None) -> dict[str, tuple[str, str]] | None:
    """{'train': (images, labels), 'test': (...)} paths in idx_dir, or None unless all four exist."""
    if not idx_dir:
        return None
    found = {}
    for split, stems in _IDX_FILES.items():
        paths = []
        for stem in stems:
            candidates = [os.path.join(idx_dir, stem + ext) for ext in (".gz", "")]
            existing = [p for p in candidates if os.path.isfile(p)]
            if not existing:
                return None
            paths.append(existing[0])
        found[split] = tuple(paths)
    return found


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from its IDX files on disk; registered in TFDS as 'fashion_mnist_idx'."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images as uint8 tensors (no TensorFlow needed), array_record."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Install Debian's package (sudo apt-get install dataset-fashion-mnist, files in "
        f"{DEFAULT_IDX_DIR}) or point config data.idx_dir at a directory with the four IDX files: "
        + ", ".join(f"{stem}[.gz]" for stems in _IDX_FILES.values() for stem in stems)
    )

    def __init__(self, *, file_format: str | None = None, **kwargs):
        # array_record by default: random access for grain, and writable without TensorFlow.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Fashion-MNIST (Zalando), 28x28 grayscale clothing images in 10 classes.",
            features=tfds.features.FeaturesDict(
                {
                    # A uint8 Tensor, not tfds.features.Image: encoding Image (PNG) needs TensorFlow.
                    # Stored as raw bytes: the default encoding writes each pixel as an int64 into a
                    # protobuf list, ~8x slower to prepare and to read.
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8, encoding="bytes"),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep the IDX files' order (record i is image i) instead of TFDS's key-hash order.
            disable_shuffling=True,
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager):
        files = find_idx_files(dl_manager.manual_dir)
        if files is None:
            raise FileNotFoundError(
                f"Fashion-MNIST IDX files not found in {dl_manager.manual_dir}. "
                + self.MANUAL_DOWNLOAD_INSTRUCTIONS
            )
        return {split: self._generate_examples(*paths) for split, paths in files.items()}

    def _generate_examples(self, images_path, labels_path):
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise ValueError(
                f"Unexpected IDX shapes: {images_path} {images.shape}, {labels_path} {labels.shape}."
            )
        for i in range(len(images)):
            yield i, {"image": images[i, :, :, None], "label": labels[i]}


# ------------------------------------------------------------------------------------------------
# Choosing the source.
# ------------------------------------------------------------------------------------------------


def _spec(data_config: ml_collections.ConfigDict) -> DatasetSpec:
    if data_config.name not in DATASETS:
        raise ValueError(
            f"Unknown dataset {data_config.name!r} (config data.name); known: {sorted(DATASETS)}."
        )
    return DATASETS[data_config.name]


def get_source(data_config: ml_collections.ConfigDict, split: str):
    """Random-access source (tfds.data_source) of records {'image': uint8 [H,W,C], 'label': int}.

    Fashion-MNIST comes from the IDX files in data_config.idx_dir when all four are there (prepared
    once into data_config.data_dir by `FashionMnistIdx`, then reused), else from TFDS's own
    fashion_mnist; the other datasets from their prepared TFDS datasets in data_config.data_dir.
    Records are normalised whichever builder (or mock_data) served them.
    """
    _spec(data_config)
    if data_config.name != "fashion_mnist":
        return _prepared_tfds(data_config.name, split, data_config.get("data_dir"))
    data_dir = data_config.get("data_dir")
    idx_dir = data_config.get("idx_dir")
    if find_idx_files(idx_dir) is None:
        logging.info("No Fashion-MNIST IDX files in %s; using TFDS fashion_mnist.", idx_dir)
        return _tfds_fashion_mnist(split, data_dir)
    logging.info("Fashion-MNIST from IDX files in %s (TFDS fashion_mnist_idx).", idx_dir)
    with _prepare_lock(data_dir):
        raw = tfds.data_source(
            "fashion_mnist_idx",
            split=split,
            data_dir=data_dir,
            download=True,
            builder_kwargs={"file_format": "array_record"},
            download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(manual_dir=idx_dir)},
            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
        )
    return _Records(raw, _decode_idx_example)


@contextlib.contextmanager
def _prepare_lock(data_dir: str | None):
    """Several processes on one machine (multi-process CPU runs) must not prepare the same dataset
    at once: TFDS writes into a temporary folder and renames it, and the second rename fails. The
    first one prepares, the others wait and then reuse it. Remote data dirs (gs://...) are not
    locked; prepare those once beforehand."""
    root = os.path.expanduser(data_dir or tfds_constants.DATA_DIR)
    if "://" in root:
        yield
        return
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".fashion_mnist_idx.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


class _Records:
    """A TFDS data source whose records come out as {'image': uint8 [H, W, C], 'label': int},
    whichever builder (or mock_data) served them."""

    def __init__(self, tfds_source, decode):
        self._source = tfds_source
        self._decode = decode

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._decode(self._source[index])

    def __getitems__(self, indices) -> list[dict[str, Any]]:
        return [self._decode(r) for r in _getitems(self._source, indices)]

    def __repr__(self) -> str:
        return f"_Records({self._source!r})"


def _decode_idx_example(serialized: bytes) -> dict[str, Any]:
    """A fashion_mnist_idx record from its serialized tf.train.Example, ~5x faster than TFDS.

    TFDS's generic numpy decoding (proto -> flatten -> per-feature decode -> nest) costs ~150 us a
    record, which made one pass over the train split take ~9 s of CPU; reading the raw bytes and
    taking the two known fields out of the proto costs ~25 us. Under tfds.testing.mock_data the raw
    records are real serialized random examples, so this path is tested there too.
    """
    feature = tf_example_pb2.Example.FromString(serialized).features.feature
    image = np.frombuffer(feature["image"].bytes_list.value[0], np.uint8)
    return {"image": image.reshape(28, 28, 1), "label": int(feature["label"].int64_list.value[0])}


def _normalise(record: dict[str, Any]) -> dict[str, Any]:
    """Decoded TFDS records: labels may be 0-d int64 arrays (mock_data), images another int type."""
    return {"image": np.asarray(record["image"], np.uint8), "label": int(record["label"])}


def _prepared_tfds(name: str, split: str, data_dir: str | None):
    """A TFDS dataset already prepared as array_record in data_dir, else one clear error.

    No download: preparing these datasets encodes their images with TensorFlow.
    """
    try:
        source = tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            builder_kwargs={"file_format": "array_record"},
        )
    except Exception as e:  # pylint: disable=broad-except
        manual = " --manual_dir=DIR_WITH_ILSVRC2012_TARS" if name == "imagenet2012" else ""
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (split {split!r}) not found as array_record in "
            f"{data_dir or tfds_constants.DATA_DIR} ({type(e).__name__}: {e}). Preparing it needs "
            f"TensorFlow: on a machine that has it, run `tfds build {name} --file_format=array_record "
            f"--data_dir=DIR{manual}`, then copy DIR here (or use a gs:// path) and set "
            f"--config.data.data_dir=DIR."
        ) from e
    return _Records(source, _normalise)


def _tfds_fashion_mnist(split: str, data_dir: str | None):
    """TFDS's own fashion_mnist: already prepared in data_dir, else downloaded, else one clear error.

    Its images are PNG-encoded: reading them without TensorFlow needs Pillow or OpenCV.
    """
    not_found = _NOT_FOUND_MSG.format(
        files=", ".join(f"{stem}[.gz]" for stems in _IDX_FILES.values() for stem in stems)
    )
    # tfds.data_source defaults to array_record only when data_dir is None: ask for it always.
    kwargs = dict(split=split, data_dir=data_dir, builder_kwargs={"file_format": "array_record"})
    try:
        return _Records(tfds.data_source("fashion_mnist", download=False, **kwargs), _normalise)
    except Exception:  # pylint: disable=broad-except
        pass  # Not prepared yet: download below.
    # Offline, TFDS's downloader retries for minutes before failing: check the host answers first.
    try:
        url = next(iter(tfds.builder_cls("fashion_mnist").url_infos))
        parsed = urllib.parse.urlparse(url)
        socket.create_connection(
            (parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)), timeout=5
        ).close()
    except OSError as e:
        raise FileNotFoundError(f"{not_found} (TFDS download impossible: {e})") from e
    try:
        source = tfds.data_source("fashion_mnist", download=True, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
        raise FileNotFoundError(f"{not_found} (TFDS download failed: {type(e).__name__}: {e})") from e
    return _Records(source, _normalise)


# ------------------------------------------------------------------------------------------------
# Crops on the host, for variable-size images.
# ------------------------------------------------------------------------------------------------


def crop_window(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (top, left, h, w) of a crop whose area fraction is
    uniform in `scale` and whose aspect ratio w/h is log-uniform in `ratio`; when 10 draws all miss
    the image, the largest centred crop with the ratio clamped to `ratio`."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_CROP_TRIES):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w
    if width / height < min(ratio):
        w, h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def random_resized_crops(image: np.ndarray, rng: np.random.Generator, crop: HostCrop) -> np.ndarray:
    """`crop.num_crops` independent random-resized crops of a uint8 [H, W, C] image: uint8 [n, S, S, C].

    Pillow crops and resizes in one call, antialiased when it shrinks, as torchvision does on images.
    """
    height, width, channels = image.shape
    pil, size = _to_pil(image), (crop.image_size, crop.image_size)
    views = []
    for _ in range(crop.num_crops):
        top, left, h, w = crop_window(rng, height, width, crop.scale, crop.ratio)
        box = (left, top, left + w, top + h)
        views.append(np.asarray(pil.resize(size, Image.Resampling.BILINEAR, box=box)))
    return np.stack(views).reshape(crop.num_crops, *size, channels)


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision's eval transform Resize(round(size / 0.875)) + CenterCrop(size), bilinear, of a
    uint8 [H, W, C] image: uint8 [size, size, C]."""
    height, width, channels = image.shape
    short = round(size / EVAL_CROP_FRACTION)
    if height <= width:  # the longer side scaled and truncated, as torchvision does
        new_h, new_w = short, int(short * width / height)
    else:
        new_h, new_w = int(short * height / width), short
    resized = _to_pil(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    resized = np.asarray(resized).reshape(new_h, new_w, channels)
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    return resized[top : top + size, left : left + size]


def _crop_record(record: dict[str, Any], rng: np.random.Generator, crop: HostCrop) -> dict[str, Any]:
    return {"views": random_resized_crops(record["image"], rng, crop), "label": np.int32(record["label"])}


# ------------------------------------------------------------------------------------------------
# Batches.
# ------------------------------------------------------------------------------------------------


def _local_batch_size(global_batch_size: int) -> int:
    count = jax.process_count()
    if global_batch_size <= 0 or global_batch_size % count:
        raise ValueError(
            f"Global batch size {global_batch_size} must be a positive multiple of the number of "
            f"processes ({count}); change the batch size in the config."
        )
    return global_batch_size // count


def _getitems(source, indices) -> list[Any]:
    """source.__getitems__(indices): one batched read (array_record reads one record at a time ~10x
    slower); one read per index where that is unavailable or broken.

    Under tfds.testing.mock_data (TFDS 4.9.10) the array_record reader is a MagicMock whose
    `__getitems__` is set as a plain attribute, so it is called without `self` and raises TypeError;
    its `__getitem__` works.
    """
    indices = [int(i) for i in indices]
    reader = getattr(source, "data_source", None)  # TFDS sources wrap the array_record reader
    if hasattr(source, "__getitems__") and not isinstance(reader, unittest.mock.Mock):
        return source.__getitems__(indices)
    return [source[i] for i in indices]


def _read_batch(source, indices, center_crop: int | None = None) -> dict[str, np.ndarray]:
    """Reads records `indices` in one call, stacked: {'image': uint8 [n,H,W,C], 'label': int32 [n]}.

    Works for any random-access source of such records (a `get_source` one, a list in a test).
    center_crop: `resize_center_crop` each image to that size first (variable-size images).
    """
    records = _getitems(source, indices)
    images = [np.asarray(r["image"], np.uint8) for r in records]
    if center_crop:
        images = [resize_center_crop(image, center_crop) for image in images]
    return {"image": np.stack(images), "label": np.asarray([r["label"] for r in records], np.int32)}


def train_iterator(
    data_config: ml_collections.ConfigDict, global_batch_size: int, seed: int, crop: HostCrop | None = None
) -> grain.DatasetIterator:
    """Infinite, shuffled (new order every epoch, from `seed`) grain iterator over the train split
    (data_config.train_split, else the dataset's).

    Each JAX process reads only its own shard (rows process_index::process_count) and yields
    process-local batches of b = global_batch_size // process_count examples:
      fixed-size images (crop=None): {'image': uint8 [b, H, W, C], 'label': int32 [b]};
      variable-size images (crop required): {'views': uint8 [b, crop.num_crops, S, S, C],
      'label': int32 [b]}, S = crop.image_size.
    The iterator has get_state()/set_state(), so orbax can save it with
    grain.checkpoint.CheckpointSave and restore it with CheckpointRestore; a restored iterator
    continues with exactly the batches the original would have produced next.
    """
    spec = _spec(data_config)
    if (crop is None) != (spec.image_shape is not None):
        raise ValueError(
            f"{data_config.name}: train_iterator takes crop=HostCrop(...) for datasets of variable-size "
            f"images, and only for those (stored shape {spec.image_shape}, crop={crop})."
        )
    local_batch = _local_batch_size(global_batch_size)
    source = get_source(data_config, data_config.get("train_split") or spec.train_split)
    indices = grain.MapDataset.range(len(source))[jax.process_index() :: jax.process_count()]
    epochs = indices.seed(seed).shuffle().repeat()  # re-seeded each epoch by repeat()
    if crop is None:
        # Batch record *indices*, then read each batch of records with one call: grain's per-record
        # path costs more Python per image than the read itself. One reader thread with a small
        # buffer: enough to overlap reading with the train step, and light on a 2-core machine.
        ds = epochs.batch(local_batch, drop_remainder=True).map(lambda idx: _read_batch(source, idx))
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))
    # Per record, decoding dominates: records are read, decoded and cropped by parallel threads,
    # each record's crops drawn from a generator seeded by `seed` and its position in the stream.
    ds = epochs.map(source.__getitem__).random_map(functools.partial(_crop_record, crop=crop))
    read_options = grain.ReadOptions(num_threads=_HOST_CROP_THREADS, prefetch_buffer_size=local_batch)
    return iter(ds.to_iter_dataset(read_options).batch(local_batch, drop_remainder=True))


def eval_batches(
    source, global_batch_size: int, center_crop: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Yields process-local batches over the whole split in order, exactly once.

    Every process yields the same number of batches, ceil(N / global_batch_size), so collectives
    never deadlock. Each batch is {'image': uint8 [global_batch_size // process_count, H, W, C],
    'label': int32 [...], 'mask': bool [...]}, padded at the end with mask=False. Process p takes
    rows [p * b_local, (p + 1) * b_local) of each global batch. center_crop=S (needed for
    variable-size images): each image is resized, shorter side round(S / 0.875), and centre-cropped
    to S x S on the host.
    """
    local_batch = _local_batch_size(global_batch_size)
    n = len(source)
    offset = jax.process_index() * local_batch
    for step in range(math.ceil(n / global_batch_size)):
        start = step * global_batch_size + offset
        indices = np.arange(start, min(start + local_batch, n))
        valid = len(indices)
        batch = _read_batch(source, indices if valid else [0], center_crop)  # [0]: only for the shapes
        if valid < local_batch:  # the last global batch: pad with zeros, masked out
            pad = local_batch - valid
            batch = {
                k: np.concatenate([v[:valid], np.zeros((pad,) + v.shape[1:], v.dtype)])
                for k, v in batch.items()
            }
        batch["mask"] = np.arange(local_batch) < valid
        yield batch
