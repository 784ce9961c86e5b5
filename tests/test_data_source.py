"""Reading TFDS's own coco/2017 schema: labels 0..79 become COCO category ids."""

import io
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ddetr_jax.data import pipeline, transforms
from ddetr_jax.data.source import (COCO_CATEGORY_IDS, DetectionSource, decode_image,
                                   latest_version_dir)

tfds.disable_progress_bar()

# (image id, height, width, grayscale, [(label 0..79, x, y, w, h, is_crowd)])
EXAMPLES = (
    (139, 48, 64, False, [(0, 4, 6, 10, 20, False), (79, 30, 10, 30, 30, True)]),
    (285, 64, 40, True, [(11, 0, 0, 40, 64, False)]),
    (632, 32, 32, False, []),
)


def _jpeg(height, width, grayscale):
    pixels = np.full((height, width, 3), 90, np.uint8)
    image = Image.fromarray(pixels).convert("L" if grayscale else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


class Coco(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS's coco/2017 feature schema (tensorflow_datasets/object_detection/coco.py)
    written with the examples above."""

    name = "coco"
    VERSION = tfds.core.Version("1.1.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2017")]
    url_infos = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(),
            "image/id": np.int64,
            "objects": tfds.features.Sequence({
                "id": np.int64,
                "area": np.int64,
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(num_classes=80),
                "is_crowd": np.bool_,
            }),
        }))

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        for image_id, height, width, grayscale, objects in EXAMPLES:
            yield image_id, {
                "image": _jpeg(height, width, grayscale),
                "image/filename": f"{image_id:012d}.jpg",
                "image/id": image_id,
                "objects": {
                    "id": np.arange(len(objects), dtype=np.int64),
                    "area": np.array([w * h for _, _, _, w, h, _ in objects], np.int64),
                    "bbox": np.array([[y / height, x / width, (y + h) / height, (x + w) / width]
                                      for _, x, y, w, h, _ in objects],
                                     np.float32).reshape(-1, 4),
                    "label": np.array([o[0] for o in objects], np.int64),
                    "is_crowd": np.array([o[5] for o in objects], bool),
                },
            }


@pytest.fixture(scope="module")
def coco_data_dir():
    with tempfile.TemporaryDirectory() as data_dir:
        Coco(data_dir=data_dir, file_format="array_record").download_and_prepare(
            download_dir=f"{data_dir}/downloads")
        yield data_dir


def test_coco_category_ids_are_the_80_used_of_90():
    assert len(COCO_CATEGORY_IDS) == 80 and COCO_CATEGORY_IDS[:3] == (1, 2, 3)
    assert COCO_CATEGORY_IDS[11] == 13 and COCO_CATEGORY_IDS[-1] == 90


def test_tfds_coco_labels_map_to_coco_ids(coco_data_dir):
    dataset_dir = latest_version_dir(coco_data_dir, "coco/2017")
    assert dataset_dir.name == "1.1.0"
    source = DetectionSource(dataset_dir, "validation")
    assert len(source) == len(EXAMPLES)
    by_id = {source[i]["image_id"]: source[i] for i in range(len(source))}
    for image_id, height, width, _, objects in EXAMPLES:
        element = by_id[image_id]
        assert element["orig_size"].tolist() == [height, width]
        assert element["labels"].tolist() == [COCO_CATEGORY_IDS[o[0]] for o in objects]
        np.testing.assert_allclose(element["boxes_xyxy"].reshape(-1, 4),
                                   np.reshape([[x, y, x + w, y + h]
                                               for _, x, y, w, h, _ in objects], (-1, 4)),
                                   atol=1e-4)
        assert element["is_crowd"].tolist() == [o[5] for o in objects]
        assert decode_image(element["image_bytes"]).shape == (height, width, 3)
    assert by_id[139]["labels"].tolist() == [1, 90] and by_id[285]["labels"].tolist() == [13]


def test_latest_version_dir_errors_without_versions(tmp_path):
    (tmp_path / "thing" / "not_a_version").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no prepared versions"):
        latest_version_dir(tmp_path, "thing")


def test_tfds_coco_flows_into_bucketed_batches(coco_data_dir):
    source = DetectionSource(latest_version_dir(coco_data_dir, "coco/2017"), "validation")
    config = pipeline.BatchConfig(global_batch_size=2, buckets=((64, 64), (112, 112)),
                                  max_targets=4, transform=transforms.TransformConfig().scaled(0.08))
    batches = list(pipeline.eval_dataset(source, config))
    valid = np.concatenate([b["example_valid"] for b in batches])
    ids = np.concatenate([b["image_id"] for b in batches])[valid]
    assert sorted(ids.tolist()) == sorted(e[0] for e in EXAMPLES)
    labels = {int(i): b["labels"][row][b["target_valid"][row]].tolist()
              for b in batches for row, i in enumerate(b["image_id"]) if b["example_valid"][row]}
    assert labels == {139: [1], 285: [13], 632: []}  # the crowd box (label 79 -> 90) is dropped
