"""Random access to a prepared detection dataset, TFDS array_record, no TensorFlow.

Two kinds of dataset are read the same way:
- one written by `ddetr_jax.data.prepare` (category list in its metadata,
  `objects/category_id` holds the COCO ids);
- TFDS's own `coco/2017`, whose `objects/label` is 0..79, the position of the
  category among COCO's 80 used ids; it is mapped to the 91-way COCO ids
  (`COCO_CATEGORY_IDS`) that the published checkpoints predict.

`DetectionSource` is a grain random-access data source; each element is

    image_bytes  bytes, JPEG or PNG, not decoded (see `decode_image`)
    image_id     int, COCO image id
    orig_size    (2,) int32, (height, width) of the stored pixels
    boxes_xyxy   (N, 4) float32, absolute pixels of the original image
    labels       (N,) int32, COCO category ids
    is_crowd     (N,) bool
    area         (N,) float32, COCO's area (segmentation area), for evaluation

`categories` lists [{"id", "name"}] of the dataset, sorted by id.
"""

import io
import pathlib
from concurrent import futures

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

# The 80 category ids COCO 2017 uses (of 1..90), in TFDS's label order.
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91)
                          if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


def latest_version_dir(data_dir, name):
    """DATA_DIR/NAME/<highest version>, e.g. name "coco/2017" or "my_set"."""
    base = pathlib.Path(data_dir).expanduser() / name
    versions = []
    for path in base.glob("*"):
        try:
            versions.append((tfds.core.Version(path.name), path))
        except ValueError:
            continue
    if not versions:
        raise FileNotFoundError(f"{base}: no prepared versions (x.y.z folders)")
    return max(versions)[1]


def categories_of(info):
    """[{"id", "name"}] of a dataset, from its metadata or TFDS coco's label names."""
    ids = category_ids_of(info)
    if info.metadata and "categories" in info.metadata:
        names = [c["name"] for c in info.metadata["categories"]]
    else:
        names = info.features["objects"]["label"].names
    return [{"id": int(i), "name": str(n)} for i, n in zip(ids, names)]


def category_ids_of(info):
    """(C,) int32: the COCO category id of each contiguous label, from the
    dataset's metadata, or COCO_CATEGORY_IDS for TFDS's coco."""
    if info.metadata and "categories" in info.metadata:
        return np.array([c["id"] for c in info.metadata["categories"]], np.int32)
    if info.name == "coco" and info.features["objects"]["label"].num_classes == 80:
        return np.array(COCO_CATEGORY_IDS, np.int32)
    raise ValueError(f"dataset {info.full_name}: no category list in its metadata and not "
                     "TFDS coco; prepare it with ddetr_jax.data.prepare")


def image_size(image_bytes):
    """(height, width) from the encoded image's header, without decoding."""
    with Image.open(io.BytesIO(image_bytes)) as image:
        return image.height, image.width


def decode_image(image_bytes):
    """JPEG / PNG bytes -> (H, W, 3) uint8 RGB (EXIF orientation not applied,
    as COCO's annotations are in the stored pixel frame)."""
    with Image.open(io.BytesIO(image_bytes)) as image:
        return np.asarray(image.convert("RGB"))


class DetectionSource:
    """One split of a prepared dataset as a grain random-access data source."""

    def __init__(self, dataset_dir, split):
        """dataset_dir: the version folder (DATA_DIR/NAME/x.y.z)."""
        self.dataset_dir, self.split = str(pathlib.Path(dataset_dir).expanduser()), split
        builder = tfds.builder_from_directory(self.dataset_dir)
        if split not in builder.info.splits:
            raise ValueError(f"{self.dataset_dir}: no split {split!r}; it has "
                             f"{sorted(builder.info.splits)}")
        self.category_ids = category_ids_of(builder.info)
        self.categories = categories_of(builder.info)
        self.has_category_id = "category_id" in builder.info.features["objects"]
        self._records = builder.as_data_source(
            split, decoders={"image": tfds.decode.SkipDecoding()})

    def __len__(self):
        return len(self._records)

    def __getitem__(self, index):
        return self.convert(self._records[index])

    def __repr__(self):
        return f"DetectionSource({self.dataset_dir!r}, {self.split!r})"

    def convert(self, record):
        """A TFDS record (image not decoded) -> the element (see the module doc)."""
        objects = record["objects"]
        if "image/size" in record:
            height, width = (int(v) for v in record["image/size"])
        else:
            height, width = image_size(record["image"])
        bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)  # (N, 4) ymin xmin ymax xmax
        scale = np.array([width, height, width, height], np.float32)
        if self.has_category_id:
            labels = np.asarray(objects["category_id"], np.int64).reshape(-1)
        else:
            labels = self.category_ids[np.asarray(objects["label"], np.int64).reshape(-1)]
        return {
            "image_bytes": record["image"],
            "image_id": int(record["image/id"]),
            "orig_size": np.array([height, width], np.int32),
            "boxes_xyxy": bbox[:, [1, 0, 3, 2]] * scale,  # (N, 4) x0 y0 x1 y1 pixels
            "labels": labels.astype(np.int32),
            "is_crowd": np.asarray(objects["is_crowd"], bool).reshape(-1),
            "area": np.asarray(objects["area"], np.float32).reshape(-1),
        }


def read_sizes(source, num_threads=16):
    """(N, 2) int32 (height, width) of every example of `source` (reads every
    record once, decoding only the image header)."""
    with futures.ThreadPoolExecutor(num_threads) as pool:
        sizes = list(pool.map(lambda i: source[i]["orig_size"], range(len(source))))
    return np.asarray(sizes, np.int32).reshape(-1, 2)
