"""A TFDS dataset builder for a COCO-format folder (array_record, no TensorFlow).

The folder has the COCO 2017 layout, one split per instances file:

    DIR/annotations/instances_<split>.json    DIR/<split>/<file_name> ...

Each image becomes one example:

    image           the JPEG/PNG bytes as they are on disk (see below for repairs)
    image/id        int64, the COCO image id
    image/filename  str, the COCO file_name
    image/size      (2,) int32, (height, width) of the stored pixels
    objects         a sequence of
        bbox          TFDS BBox: normalised (ymin, xmin, ymax, xmax)
        category_id   int64, the COCO category id
        label         ClassLabel, the contiguous index of category_id among the
                      dataset's categories sorted by id
        is_crowd      bool
        area          float32, COCO's area (the segmentation area; the box area
                      of the clipped box if the annotation has none)

The category list (`[{"id", "name"}]`, sorted by id, label = position) is kept
in `info.metadata["categories"]`.

Bad input has a defined outcome, recorded in a `PrepareReport` (printed by
`ddetr_jax.data.prepare`); nothing is dropped or changed silently:

- malformed JSON, a JSON without `images` / `categories` lists, malformed or
  duplicate categories, a missing image folder: `CocoFormatError` naming the
  file and the problem, raised before anything is written;
- image files that are missing, empty, unreadable, truncated or corrupt: the
  image and its annotations are skipped;
- one file under several image ids: kept under each, with a note;
- a stored size that differs from the JSON's width / height: skipped, unless it
  is exactly the EXIF-rotated size (the annotations were made on the rotated
  picture), in which case the rotation is applied and the image re-encoded;
- EXIF orientation whose rotated size does not disagree with the JSON: the
  annotations are taken in the stored pixel frame (as COCO and every decoder
  here do) and a note is recorded;
- anything but 8-bit RGB JPEG/PNG (grayscale, palette, RGBA, CMYK, 16-bit,
  other formats) is converted to 8-bit RGB and re-encoded as PNG (16-bit values
  scaled by 255 / 65535; alpha dropped);
- annotations with an unknown category id, an image id with no image, a bbox
  that is not four finite numbers, a width or height below MIN_BOX_SIZE
  (zero, negative or degenerate), or less than that inside the image:
  skipped; boxes partly outside the image: clipped.

The dataset records where it came from in `info.metadata["source"]`: the
SHA-256 of every instances JSON and of the image folders' listings (file
names and byte sizes), so that preparing a changed folder again is noticed
(`ddetr_jax.data.prepare`).
"""

import collections
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import pathlib
import re
import types

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps, UnidentifiedImageError

DATASET_VERSION = "1.0.0"
INSTANCES_PATTERN = re.compile(r"^instances_(\w+)\.json$")
PASS_THROUGH_FORMATS = ("JPEG", "PNG")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # these swap width and height
# Boxes narrower or lower than this (pixels) are degenerate and skipped, as the authors'
# transforms drop boxes without area: they cover no pixel, and normalised to a large
# image in float32 their width would round to zero.
MIN_BOX_SIZE = 0.01


class CocoFormatError(ValueError):
    """A COCO-format folder or annotation file that cannot be prepared."""


class SkipImage(Exception):
    """An image that cannot be used; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class ReportItem:
    """One skipped or repaired item: split, file, action, reason."""

    split: str
    file: str
    action: str  # "skipped image", "skipped annotation", "repaired", "note"
    reason: str


@dataclasses.dataclass
class PrepareReport:
    """What preparation wrote, skipped and repaired."""

    examples: dict = dataclasses.field(default_factory=dict)  # split -> count
    items: list = dataclasses.field(default_factory=list)  # [ReportItem]
    reused: bool = False  # True: nothing written, the report of an earlier preparation

    def save(self, path):
        """Writes the report as JSON (read back by `load`)."""
        pathlib.Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path):
        """A saved report, marked reused."""
        saved = json.loads(pathlib.Path(path).read_text())
        return cls(saved["examples"], [ReportItem(**item) for item in saved["items"]],
                   reused=True)

    def add(self, split, file, action, reason):
        self.items.append(ReportItem(split, str(file), action, reason))

    def counts(self, split):
        """{action: number of items} for `split`."""
        return collections.Counter(item.action for item in self.items if item.split == split)

    def format(self):
        """The report as text: examples and counts per split, then every item."""
        lines = []
        for split, count in self.examples.items():
            counted = ", ".join(f"{n} {action}" for action, n in sorted(self.counts(split).items()))
            lines.append(f"{split}: {count} examples" + (f" ({counted})" if counted else ""))
        for item in self.items:
            lines.append(f"  [{item.split}] {item.action}: {item.file}: {item.reason}")
        return "\n".join(lines)


def find_splits(coco_dir):
    """{split: instances JSON path} for every annotations/instances_<split>.json."""
    annotation_dir = pathlib.Path(coco_dir) / "annotations"
    splits = {}
    if annotation_dir.is_dir():
        for path in sorted(annotation_dir.iterdir()):
            match = INSTANCES_PATTERN.match(path.name)
            if match:
                splits[match.group(1)] = path
    if not splits:
        raise CocoFormatError(f"{annotation_dir}: no annotations/instances_<split>.json files")
    return splits


def source_fingerprint(coco_dir, splits):
    """SHA-256 (hex) of every split's instances JSON bytes and image folder listing
    (relative file names and byte sizes, sorted); splits: {split: JSON path}."""
    digest = hashlib.sha256()
    for split, path in sorted(splits.items()):
        digest.update(f"split {split}\n".encode())
        digest.update(pathlib.Path(path).read_bytes())
        folder = pathlib.Path(coco_dir) / split
        for file in sorted(f for f in folder.rglob("*") if f.is_file()):
            digest.update(f"{file.relative_to(folder).as_posix()} {file.stat().st_size}\n"
                          .encode())
    return digest.hexdigest()


def read_instances(path):
    """Parses an instances JSON; checks its top-level structure.

    Returns the dict with `images`, `categories` and `annotations` (an empty
    list if absent, as for test splits). Raises CocoFormatError naming `path`.
    """
    try:
        coco = json.loads(pathlib.Path(path).read_text())
    except json.JSONDecodeError as error:
        raise CocoFormatError(f"{path}: malformed JSON at line {error.lineno} column "
                              f"{error.colno}: {error.msg}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise CocoFormatError(f"{path}: cannot read: {error}") from error
    if not isinstance(coco, dict):
        raise CocoFormatError(f"{path}: the top level is not a JSON object")
    for key in ("images", "categories"):
        if not isinstance(coco.get(key), list):
            raise CocoFormatError(f"{path}: no '{key}' list")
    coco.setdefault("annotations", [])
    if not isinstance(coco["annotations"], list):
        raise CocoFormatError(f"{path}: 'annotations' is not a list")
    return coco


def merge_categories(cocos_by_path):
    """The categories of all splits as [{"id", "name"}] sorted by id.

    Raises CocoFormatError for a category without an integer id > 0 or a
    string name, and for an id or a name given two different meanings.
    """
    names = {}
    for path, coco in cocos_by_path.items():
        for category in coco["categories"]:
            cid = category.get("id") if isinstance(category, dict) else None
            name = category.get("name") if isinstance(category, dict) else None
            if not isinstance(cid, int) or isinstance(cid, bool) or cid <= 0 \
                    or not isinstance(name, str):
                raise CocoFormatError(f"{path}: malformed category {category!r} "
                                      "(needs an integer id > 0 and a string name)")
            if names.setdefault(cid, name) != name:
                raise CocoFormatError(f"{path}: category id {cid} is named both "
                                      f"{names[cid]!r} and {name!r}")
    by_name = collections.Counter(names.values())
    duplicated = sorted(name for name, n in by_name.items() if n > 1)
    if duplicated:
        raise CocoFormatError(f"{', '.join(map(str, cocos_by_path))}: category names used by "
                              f"more than one id: {duplicated}")
    return [{"id": cid, "name": names[cid]} for cid in sorted(names)]


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def index_images(coco, split, report):
    """{image id: image entry} of the usable entries (an int id, a string
    file_name, and if given positive integer width and height); the others and
    repeated ids are reported as skipped, a file used by several ids is noted."""
    images, id_of_file = {}, {}
    for entry in coco["images"]:
        file_name = entry.get("file_name") if isinstance(entry, dict) else None
        image_id = entry.get("id") if isinstance(entry, dict) else None
        sizes = [entry.get(k) for k in ("height", "width")] if isinstance(entry, dict) else []
        if not isinstance(file_name, str) or not isinstance(image_id, int) \
                or isinstance(image_id, bool):
            report.add(split, repr(entry)[:80], "skipped image",
                       "image entry needs an integer 'id' and a string 'file_name'")
        elif any(s is not None and (not isinstance(s, int) or s <= 0) for s in sizes):
            report.add(split, file_name, "skipped image",
                       f"height / width {sizes} are not positive integers")
        elif image_id in images:
            report.add(split, file_name, "skipped image", f"duplicate image id {image_id}")
        else:
            images[image_id] = entry
            first = id_of_file.setdefault(file_name, image_id)
            if first != image_id:
                report.add(split, file_name, "note", f"the same file as image id {first}: "
                           f"kept under both, as image id {image_id} too")
    return images


def group_annotations(coco, images, category_ids, split, report):
    """{image id: [annotation]} of the annotations whose image exists, whose
    category is known and whose bbox is four finite numbers with width and height
    of at least MIN_BOX_SIZE; the others are reported as skipped."""
    grouped = collections.defaultdict(list)
    for annotation in coco["annotations"]:
        if not isinstance(annotation, dict):
            report.add(split, repr(annotation)[:80], "skipped annotation", "not a JSON object")
            continue
        name = f"annotation {annotation.get('id')}"
        bbox = annotation.get("bbox")
        if annotation.get("image_id") not in images:
            report.add(split, name, "skipped annotation",
                       f"no image with id {annotation.get('image_id')!r}")
        elif annotation.get("category_id") not in category_ids:
            report.add(split, name, "skipped annotation",
                       f"unknown category id {annotation.get('category_id')!r}")
        elif not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            report.add(split, name, "skipped annotation", f"malformed bbox {bbox!r}")
        elif bbox[2] < MIN_BOX_SIZE or bbox[3] < MIN_BOX_SIZE:
            report.add(split, name, "skipped annotation",
                       f"bbox {bbox}: width or height below {MIN_BOX_SIZE} px (zero, negative "
                       "or degenerate)")
        else:
            grouped[annotation["image_id"]].append(annotation)
    return grouped


def clip_box(bbox, height, width):
    """COCO [x, y, w, h] clipped to the image: (x0, y0, x1, y1) floats, or None
    if less than MIN_BOX_SIZE of its width or height is inside."""
    x0, y0 = max(bbox[0], 0.0), max(bbox[1], 0.0)
    x1, y1 = min(bbox[0] + bbox[2], width), min(bbox[1] + bbox[3], height)
    if x1 - x0 < MIN_BOX_SIZE or y1 - y0 < MIN_BOX_SIZE:
        return None
    return float(x0), float(y0), float(x1), float(y1)


def _to_rgb(image):
    """(PIL RGB image, reason or None): 16-bit values scaled to 8 bits, every
    other mode converted by PIL (alpha dropped)."""
    if image.mode == "RGB":
        return image, None
    if image.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.float64)
        narrow = np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(narrow, mode="L").convert("RGB"), \
            f"16-bit {image.mode} scaled to 8-bit RGB"
    return image.convert("RGB"), f"{image.mode} converted to RGB"


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def load_image(path, json_height, json_width):
    """Reads and checks one image file.

    json_height / json_width: the annotation's size, or None if not given.
    Returns (encoded bytes, (height, width), [(action, reason)]) with action
    "repaired" or "note"; the bytes are the file's own unless a repair
    re-encoded them as PNG. Raises SkipImage.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise SkipImage("file not found")
    data = path.read_bytes()
    if not data:
        raise SkipImage("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
            width, height = image.size
            notes, rotated = [], None
            json_size = (json_height or height, json_width or width)
            if json_size != (height, width):
                if orientation in TRANSPOSING_ORIENTATIONS and json_size == (width, height):
                    rotated = ImageOps.exif_transpose(image)
                    notes.append(("repaired", f"EXIF orientation {orientation} applied: the "
                                  f"annotation size {json_size[0]}x{json_size[1]} is the "
                                  "rotated picture's"))
                else:
                    raise SkipImage(f"annotation says {json_size[0]}x{json_size[1]} (HxW), "
                                    f"the file holds {height}x{width}")
            elif orientation != 1:
                notes.append(("note", f"EXIF orientation {orientation} ignored: annotations "
                              "are in the stored pixel frame"))
            rgb, reason = _to_rgb(rotated if rotated is not None else image)
            if reason:
                notes.append(("repaired", reason))
            if rotated is None and reason is None and image.format in PASS_THROUGH_FORMATS:
                return data, (height, width), notes
            if image.format not in PASS_THROUGH_FORMATS:
                notes.append(("repaired", f"{image.format} re-encoded as PNG"))
            return _png_bytes(rgb), (rgb.height, rgb.width), notes
    except SkipImage:
        raise
    except UnidentifiedImageError as error:
        raise SkipImage(f"cannot decode: {path.name} is not an image format Pillow reads") \
            from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise SkipImage(f"cannot decode: {error}") from error


def _load_image_job(job):
    """Picklable wrapper for a worker: job = (path, height, width) ->
    ("ok", load_image(...)) or ("skip", reason)."""
    try:
        return "ok", load_image(*job)
    except SkipImage as skip:
        return "skip", str(skip)


def make_objects(annotations, height, width, label_of, split, report):
    """The `objects` feature of one image from its checked annotations (see
    group_annotations); boxes are clipped to (height, width) and reported when
    clipped, skipped when wholly outside."""
    bbox, category_id, label, is_crowd, area = [], [], [], [], []
    for annotation in annotations:
        name = f"annotation {annotation.get('id')}"
        clipped = clip_box(annotation["bbox"], height, width)
        if clipped is None:
            report.add(split, name, "skipped annotation",
                       f"bbox {annotation['bbox']} lies outside the {height}x{width} image "
                       f"(or less than {MIN_BOX_SIZE} px of it inside)")
            continue
        x0, y0, x1, y1 = clipped
        x, y, w, h = annotation["bbox"]
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            report.add(split, name, "repaired", f"bbox {annotation['bbox']} clipped to the "
                       f"{height}x{width} image: [{x0}, {y0}, {x1 - x0}, {y1 - y0}]")
        bbox.append([y0 / height, x0 / width, y1 / height, x1 / width])
        category_id.append(annotation["category_id"])
        label.append(label_of[annotation["category_id"]])
        is_crowd.append(bool(annotation.get("iscrowd", 0)))
        given_area = annotation.get("area")
        area.append(given_area if _is_number(given_area) else (x1 - x0) * (y1 - y0))
    return {
        "bbox": np.asarray(bbox, np.float32).reshape(-1, 4),
        "category_id": np.asarray(category_id, np.int64),
        "label": np.asarray(label, np.int64),
        "is_crowd": np.asarray(is_crowd, bool),
        "area": np.asarray(area, np.float32),
    }


def features(category_names):
    """The FeaturesDict of a prepared COCO-format dataset (see the module doc)."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "image/id": np.int64,
        "image/filename": tfds.features.Text(),
        "image/size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
        "objects": tfds.features.Sequence({
            "bbox": tfds.features.BBoxFeature(),
            "category_id": np.int64,
            "label": tfds.features.ClassLabel(names=category_names),
            "is_crowd": np.bool_,
            "area": np.float32,
        }),
    })


class CocoFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Prepares a COCO-format folder; make a named subclass with `builder_class`."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "COCO-format folder prepared by ddetr_jax."}
    url_infos = None  # nothing is downloaded, so TFDS need not look for checksum files

    def __init__(self, *, coco_dir, workers=1, extra_metadata=None, **kwargs):
        """Reads and checks every instances JSON (raises CocoFormatError) before
        TFDS writes anything. extra_metadata: more info.metadata entries."""
        self.coco_dir = pathlib.Path(coco_dir)
        self.workers = workers
        self.report = PrepareReport()
        splits = find_splits(self.coco_dir)
        self.instances = {split: read_instances(path) for split, path in splits.items()}
        for split in self.instances:
            if not (self.coco_dir / split).is_dir():
                raise CocoFormatError(f"{self.coco_dir / split}: image folder of split "
                                      f"'{split}' not found")
        self.categories = merge_categories({splits[s]: coco for s, coco in self.instances.items()})
        self.source = {"sha256": source_fingerprint(self.coco_dir, splits)}
        self.extra_metadata = dict(extra_metadata or {})
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"COCO-format folder {self.coco_dir.name} prepared by ddetr_jax.",
            features=features([c["name"] for c in self.categories]),
            metadata=tfds.core.MetadataDict(categories=self.categories, source=self.source,
                                            **self.extra_metadata),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        return {split: self._generate_examples(split) for split in self.instances}

    def _generate_examples(self, split):
        """Yields (image id, example) in image-id order; see the module doc."""
        coco = self.instances[split]
        images = index_images(coco, split, self.report)
        label_of = {c["id"]: label for label, c in enumerate(self.categories)}
        grouped = group_annotations(coco, images, label_of, split, self.report)
        ordered = sorted(images)
        jobs = [(self.coco_dir / split / images[i]["file_name"], images[i].get("height"),
                 images[i].get("width")) for i in ordered]
        count = 0
        for image_id, (status, result) in zip(ordered, self._map_images(jobs)):
            file_name = images[image_id]["file_name"]
            if status == "skip":
                self.report.add(split, file_name, "skipped image", result)
                for annotation in grouped.get(image_id, ()):
                    self.report.add(split, f"annotation {annotation.get('id')}",
                                    "skipped annotation", f"its image {file_name} was skipped")
                continue
            encoded, (height, width), notes = result
            for action, reason in notes:
                self.report.add(split, file_name, action, reason)
            yield image_id, {
                "image": encoded,
                "image/id": image_id,
                "image/filename": file_name,
                "image/size": np.array([height, width], np.int32),
                "objects": make_objects(grouped.get(image_id, ()), height, width,
                                        label_of, split, self.report),
            }
            count += 1
        self.report.examples[split] = count

    def _map_images(self, jobs):
        """_load_image_job over `jobs` in order, in `self.workers` processes."""
        if self.workers <= 1:
            yield from map(_load_image_job, jobs)
            return
        with multiprocessing.get_context("spawn").Pool(self.workers) as pool:
            yield from pool.imap(_load_image_job, jobs, chunksize=16)


def check_name(name):
    """`name` if it is a valid TFDS dataset name (lower snake case), else ValueError."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"dataset name {name!r} must be lower snake case ([a-z][a-z0-9_]*, "
                         "as TFDS requires), e.g. 'my_set'")
    return name


def builder_class(name):
    """A CocoFolderBuilder subclass whose TFDS name is `name` (lower snake case)."""
    check_name(name)
    class_name = "".join(part.title() for part in name.split("_")) or "Dataset"
    return types.new_class(class_name, (CocoFolderBuilder,), {"skip_registration": True},
                           lambda namespace: namespace.update(name=name, __module__=__name__))
