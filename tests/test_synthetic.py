"""The synthetic COCO-format dataset: determinism, COCO validity, contents, CLI."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ddetr_jax.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_IMAGES, VAL_IMAGES = 6, 3  # enough for one crowd and one empty image per split


def _files(root):
    """{relative path: bytes} of every file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(folder, {split: COCO dict}) written with seed 0."""
    out = tmp_path_factory.mktemp("seed0")
    return out, synthetic.write_dataset(out, TRAIN_IMAGES, VAL_IMAGES, seed=0)


def test_layout(dataset):
    out, cocos = dataset
    for split in ("train", "validation"):
        on_disk = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        assert on_disk == cocos[split]
        names = sorted(p.name for p in (out / split).iterdir())
        assert names == sorted(image["file_name"] for image in on_disk["images"])
    assert len(cocos["train"]["images"]) == TRAIN_IMAGES
    assert len(cocos["validation"]["images"]) == VAL_IMAGES


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    out, _ = dataset
    synthetic.write_dataset(tmp_path / "again", TRAIN_IMAGES, VAL_IMAGES, seed=0)
    synthetic.write_dataset(tmp_path / "other", TRAIN_IMAGES, VAL_IMAGES, seed=1)
    reference, again, other = _files(out), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert again == reference
    assert other.keys() == reference.keys()
    assert all(other[name] != reference[name] for name in reference)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_valid_coco(dataset, split):
    _, cocos = dataset
    coco = cocos[split]
    assert {"info", "licenses", "images", "annotations", "categories"} <= coco.keys()
    category_ids = [c["id"] for c in coco["categories"]]
    assert len(category_ids) >= 5 and len(set(category_ids)) == len(category_ids)
    assert category_ids != list(range(1, len(category_ids) + 1)), "ids must not be contiguous"
    images = {image["id"]: image for image in coco["images"]}
    assert len(images) == len(coco["images"]) and 0 not in images
    annotation_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(annotation_ids)) == len(annotation_ids) and 0 not in annotation_ids
    for a in coco["annotations"]:
        image = images[a["image_id"]]
        assert a["category_id"] in category_ids
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= image["width"] and y + h <= image["height"]
        assert 0 < a["area"] <= w * h
        assert a["iscrowd"] in (0, 1)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_crowd_and_empty_images_present(dataset, split):
    _, cocos = dataset
    coco = cocos[split]
    assert any(a["iscrowd"] for a in coco["annotations"])
    assert any(not a["iscrowd"] for a in coco["annotations"])
    with_objects = {a["image_id"] for a in coco["annotations"]}
    assert any(image["id"] not in with_objects for image in coco["images"])


def test_images_decode_to_declared_size(dataset):
    out, cocos = dataset
    sizes = set()
    for split, coco in cocos.items():
        for image in coco["images"]:
            with Image.open(out / split / image["file_name"]) as decoded:
                assert decoded.format == "JPEG" and decoded.mode == "RGB"
                assert decoded.size == (image["width"], image["height"])
            short, long = sorted(decoded.size)
            assert synthetic.SHORT_SIDE[0] <= short <= synthetic.SHORT_SIDE[1]
            assert long <= round(short * synthetic.ASPECT[1])
            sizes.add(decoded.size)
    assert len(sizes) > 1


def test_annotate_full_box_and_visible_area():
    """An occluded object keeps its full box; its area counts only visible pixels."""
    below = np.zeros((20, 30), dtype=bool)
    below[2:12, 3:13] = True  # 10 x 10 at x=3, y=2
    above = np.zeros((20, 30), dtype=bool)
    above[7:17, 8:28] = True  # 20 x 10 at x=8, y=7, covers 5 x 5 of `below`
    colour = np.zeros(3, np.float32)
    objects = [synthetic.DrawnObject(1, below, colour, iscrowd=1),
               synthetic.DrawnObject(5, above, colour, iscrowd=0)]
    assert synthetic.annotate(objects) == [
        {"category_id": 1, "bbox": [3, 2, 10, 10], "area": 75, "iscrowd": 1},
        {"category_id": 5, "bbox": [8, 7, 20, 10], "area": 200, "iscrowd": 0},
    ]
    assert not synthetic.hides_too_much(above, objects[:1])
    assert synthetic.hides_too_much(np.ones((20, 30), dtype=bool), objects[:1])


def test_rejects_negative_arguments(tmp_path):
    with pytest.raises(ValueError, match="seed=-1"):
        synthetic.write_dataset(tmp_path, 1, 1, seed=-1)


def test_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ddetr_jax.data.synthetic", "--out", str(tmp_path),
         "--train-images", "3", "--val-images", "2", "--seed", "7"],
        cwd=REPO, capture_output=True, text=True, check=True)
    assert "train: 3 images (1 empty)" in result.stdout
    assert "validation: 2 images (1 empty)" in result.stdout
    assert "ring (id 8)" in result.stdout
    assert (tmp_path / "annotations" / "instances_validation.json").is_file()
    assert len(list((tmp_path / "train").glob("*.jpg"))) == 3


def test_mask_edge():
    mask = np.zeros((6, 7), dtype=bool)
    mask[1:5, 2:7] = True  # touches the right border
    edge = synthetic.mask_edge(mask)
    interior = np.zeros_like(mask)
    interior[2:4, 3:6] = True
    np.testing.assert_array_equal(edge, mask & ~interior)
