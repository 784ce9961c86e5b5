"""The COCO-format folder builder: every field read back, every bad case counted."""

import io
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ddetr_jax.data import coco_builder, prepare, synthetic
from ddetr_jax.data.source import DetectionSource, decode_image

tfds.disable_progress_bar()


def _jpeg(pixels, **save_args):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, **save_args)
    return buffer.getvalue()


def _by_id(source):
    return {source[i]["image_id"]: source[i] for i in range(len(source))}


@pytest.fixture(scope="module")
def synthetic_prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    cocos = synthetic.write_dataset(root / "coco", train_images=6, val_images=3, seed=0)
    dataset_dir, report = prepare.prepare(root / "coco", "shapes", root / "tfds")
    return root, cocos, dataset_dir, report


def test_synthetic_round_trip_every_field(synthetic_prepared):
    root, cocos, dataset_dir, report = synthetic_prepared
    assert report.examples == {"train": 6, "validation": 3} and report.items == []
    builder = tfds.builder_from_directory(str(dataset_dir))
    assert builder.info.metadata["categories"] == [
        {"id": cid, "name": name} for cid, name, _ in synthetic.CATEGORIES]
    for split, coco in cocos.items():
        source = _by_id(DetectionSource(dataset_dir, split))
        raw = {int(r["image/id"]): r for r in builder.as_data_source(split)}
        assert sorted(source) == [image["id"] for image in coco["images"]]
        for image in coco["images"]:
            element, record = source[image["id"]], raw[image["id"]]
            assert element["image_bytes"] == (root / "coco" / split / image["file_name"]).read_bytes()
            assert record["image/filename"].decode() == image["file_name"]
            assert element["orig_size"].tolist() == [image["height"], image["width"]]
            assert record["image"].shape == (image["height"], image["width"], 3)
            annotations = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            expected_xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)]
            np.testing.assert_allclose(element["boxes_xyxy"].reshape(-1, 4),
                                       np.reshape(expected_xyxy, (-1, 4)), atol=1e-3)
            assert element["labels"].tolist() == [a["category_id"] for a in annotations]
            assert element["is_crowd"].tolist() == [bool(a["iscrowd"]) for a in annotations]
            ids = [c["id"] for c in coco["categories"]]
            assert list(record["objects"]["label"]) == [ids.index(a["category_id"])
                                                        for a in annotations]
            np.testing.assert_allclose(record["objects"]["area"],
                                       [a["area"] for a in annotations])


def _bad_folder(root):
    """A folder with one of each bad case; returns the coco dict written."""
    (root / "annotations").mkdir(parents=True)
    images = root / "train"
    images.mkdir()
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[5:15, 10:30] = 255
    (images / "good.jpg").write_bytes(_jpeg(rgb))
    (images / "corrupt.jpg").write_bytes(b"not an image at all")
    (images / "empty.jpg").write_bytes(b"")
    (images / "truncated.jpg").write_bytes(_jpeg(rgb)[:200])
    (images / "wrong_size.jpg").write_bytes(_jpeg(rgb))
    Image.fromarray(rgb[..., 0]).save(images / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((30, 40), 7, np.uint8)])).save(images / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(images / "cmyk.jpg")
    sixteen = np.zeros((30, 40), np.uint16)
    sixteen[:, 20:] = 65535
    sixteen[:, :20] = 32896
    Image.fromarray(sixteen).save(images / "sixteen.png")
    # Stored 30x40 with orientation 6 (rotate 90 degrees clockwise to view); the
    # JSON describes the viewed 40x30 picture, where the block lies at x 15..25, y 10..30.
    exif = Image.Exif()
    exif[coco_builder.EXIF_ORIENTATION_TAG] = 6
    (images / "exif_rotated.jpg").write_bytes(_jpeg(rgb, exif=exif.tobytes()))
    exif[coco_builder.EXIF_ORIENTATION_TAG] = 3
    (images / "exif_same_size.jpg").write_bytes(_jpeg(rgb, exif=exif.tobytes()))
    entries = [("good.jpg", 30, 40), ("missing.jpg", 30, 40), ("corrupt.jpg", 30, 40),
               ("truncated.jpg", 30, 40), ("wrong_size.jpg", 40, 40), ("gray.png", 30, 40),
               ("rgba.png", 30, 40), ("cmyk.jpg", 30, 40), ("sixteen.png", 30, 40),
               ("exif_rotated.jpg", 40, 30), ("exif_same_size.jpg", 30, 40),
               ("empty.jpg", 30, 40), ("good.jpg", 30, 40)]
    coco_images = [{"id": i + 1, "file_name": f, "height": h, "width": w}
                   for i, (f, h, w) in enumerate(entries)]
    boxes = [[10, 5, 20, 10], [1, 1, 0, 5], [1, 1, 5, -2], [30, 20, 20, 20],
             [50, 50, 5, 5], [10, 5, 20, 10], [10, 5, 20, 10], "abc"]
    categories = [3, 3, 3, 3, 3, 99, 3, 3]
    image_ids = [1, 1, 1, 1, 1, 1, 999, 1]
    annotations = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": 1.0,
                    "iscrowd": 0} for k, (i, c, b) in enumerate(zip(image_ids, categories, boxes))]
    annotations.append({"id": 20, "image_id": 10, "category_id": 3, "bbox": [15, 10, 10, 20],
                        "area": 200, "iscrowd": 1})
    annotations.append({"id": 21, "image_id": 3, "category_id": 3, "bbox": [1, 1, 5, 5]})
    # Degenerate: 1e-9 px wide; 0.005 px of it inside the 40 px wide image.
    annotations.append({"id": 22, "image_id": 1, "category_id": 3, "bbox": [10, 5, 1e-9, 5]})
    annotations.append({"id": 23, "image_id": 1, "category_id": 3, "bbox": [39.995, 5, 10, 5]})
    coco = {"images": coco_images, "annotations": annotations,
            "categories": [{"id": 3, "name": "thing"}, {"id": 1, "name": "other"}]}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    return coco


@pytest.fixture(scope="module")
def bad_prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    _bad_folder(root / "coco")
    dataset_dir, report = prepare.prepare(root / "coco", "bad", root / "tfds", workers=2)
    return root, dataset_dir, report


def test_bad_input_counts_and_reasons(bad_prepared):
    _, _, report = bad_prepared
    assert report.examples == {"train": 8}
    by_file = {}
    for item in report.items:
        by_file.setdefault(item.file, []).append((item.action, item.reason))
    assert report.counts("train") == {"skipped image": 5, "skipped annotation": 9,
                                      "repaired": 6, "note": 2}
    assert by_file["missing.jpg"] == [("skipped image", "file not found")]
    assert by_file["corrupt.jpg"] == [
        ("skipped image", "cannot decode: corrupt.jpg is not an image format Pillow reads")]
    assert by_file["empty.jpg"] == [("skipped image", "empty file (0 bytes)")]
    assert by_file["good.jpg"] == [("note", "the same file as image id 1: kept under both, "
                                            "as image id 13 too")]
    assert by_file["truncated.jpg"][0][1].startswith("cannot decode")
    assert "the file holds 30x40" in by_file["wrong_size.jpg"][0][1]
    for degenerate in ("annotation 2", "annotation 3", "annotation 22"):
        assert "width or height below 0.01 px" in by_file[degenerate][0][1], degenerate
    assert by_file["annotation 23"][0][0] == "skipped annotation"
    assert "less than 0.01 px of it inside" in by_file["annotation 23"][0][1]
    assert by_file["annotation 4"][0][0] == "repaired"
    assert "outside" in by_file["annotation 5"][0][1]
    assert "unknown category id 99" in by_file["annotation 6"][0][1]
    assert "no image with id 999" in by_file["annotation 7"][0][1]
    assert "malformed bbox" in by_file["annotation 8"][0][1]
    assert "its image corrupt.jpg was skipped" in by_file["annotation 21"][0][1]
    assert by_file["gray.png"] == [("repaired", "L converted to RGB")]
    assert by_file["rgba.png"] == [("repaired", "RGBA converted to RGB")]
    assert by_file["cmyk.jpg"] == [("repaired", "CMYK converted to RGB")]
    assert by_file["sixteen.png"][0][1].startswith("16-bit")
    assert "EXIF orientation 6 applied" in by_file["exif_rotated.jpg"][0][1]
    assert by_file["exif_same_size.jpg"][0][0] == "note"
    assert "skipped image: corrupt.jpg: cannot decode" in report.format()


def test_bad_input_examples_are_right(bad_prepared):
    root, dataset_dir, _ = bad_prepared
    source = DetectionSource(dataset_dir, "train")
    by_id = _by_id(source)
    assert sorted(by_id) == [1, 6, 7, 8, 9, 10, 11, 13]
    good = by_id[1]
    assert good["image_bytes"] == (root / "coco" / "train" / "good.jpg").read_bytes()
    np.testing.assert_allclose(good["boxes_xyxy"], [[10, 5, 30, 15], [30, 20, 40, 30]], atol=1e-4)
    assert good["labels"].tolist() == [3, 3]
    assert by_id[13]["image_bytes"] == good["image_bytes"]
    for image_id in (6, 7, 8, 9):
        pixels = decode_image(by_id[image_id]["image_bytes"])
        assert pixels.shape == (30, 40, 3)
        assert Image.open(io.BytesIO(by_id[image_id]["image_bytes"])).mode == "RGB"
    sixteen = decode_image(by_id[9]["image_bytes"])
    assert sixteen[0, 0].tolist() == [128] * 3 and sixteen[0, 39].tolist() == [255] * 3
    rotated = by_id[10]
    assert rotated["orig_size"].tolist() == [40, 30]
    np.testing.assert_allclose(rotated["boxes_xyxy"], [[15, 10, 25, 30]], atol=1e-4)
    assert rotated["is_crowd"].tolist() == [True]
    pixels = decode_image(rotated["image_bytes"])
    assert pixels.shape == (40, 30, 3)
    bright = np.argwhere(pixels[..., 0] > 128)  # (K, 2) rows, cols of the block
    assert bright.min(axis=0).tolist() == [10, 15] and bright.max(axis=0).tolist() == [29, 24]
    assert builder_categories(dataset_dir) == [{"id": 1, "name": "other"},
                                               {"id": 3, "name": "thing"}]


def builder_categories(dataset_dir):
    return tfds.builder_from_directory(str(dataset_dir)).info.metadata["categories"]


@pytest.mark.parametrize("text, problem", [
    ('{"images": [', "malformed JSON at line 1"),
    ('[1, 2]', "top level is not a JSON object"),
    ('{"categories": []}', "no 'images' list"),
    ('{"images": [], "categories": [{"id": "a", "name": "x"}]}', "malformed category"),
    ('{"images": [], "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "x"}]}',
     "more than one id"),
])
def test_bad_json_is_a_clear_error(tmp_path, text, problem):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train").mkdir()
    path = tmp_path / "annotations" / "instances_train.json"
    path.write_text(text)
    with pytest.raises(coco_builder.CocoFormatError, match=problem) as error:
        prepare.prepare(tmp_path, "broken", tmp_path / "out")
    assert str(path) in str(error.value)
    assert not (tmp_path / "out" / "broken").exists()


def test_missing_image_folder_and_bad_name(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text('{"images": [], "categories": []}')
    with pytest.raises(coco_builder.CocoFormatError, match="image folder of split 'val'"):
        prepare.prepare(tmp_path, "x", tmp_path / "out")
    with pytest.raises(ValueError, match="lower snake case"):
        coco_builder.builder_class("Bad-Name")


def test_cli_refuses_a_bad_name_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        prepare.main(["--coco-dir", str(tmp_path), "--name", "MyCoco", "--data-dir",
                      str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --name: dataset name 'MyCoco' must be lower snake case" in err
    assert "Traceback" not in err


def test_cli_reports_and_fails_cleanly(tmp_path, capsys):
    synthetic.write_dataset(tmp_path / "coco", train_images=2, val_images=1, seed=1)
    assert prepare.main(["--coco-dir", str(tmp_path / "coco"), "--name", "tiny",
                         "--data-dir", str(tmp_path / "tfds"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "train: 2 examples" in out and "validation: 1 examples" in out
    assert prepare.main(["--coco-dir", str(tmp_path / "nothing"), "--name", "tiny",
                         "--data-dir", str(tmp_path / "tfds")]) == 2
    assert "no annotations/instances_<split>.json" in capsys.readouterr().err


def test_preparing_again_reuses_refuses_or_rebuilds(tmp_path, capsys):
    """Same source: nothing written, the saved report shown; edited annotations or a changed
    image list: refused (exit 2) until --overwrite rebuilds it."""
    coco = tmp_path / "coco"
    synthetic.write_dataset(coco, train_images=2, val_images=1, seed=1)
    args = ["--coco-dir", str(coco), "--name", "tiny", "--data-dir", str(tmp_path / "tfds"),
            "--workers", "1"]
    assert prepare.main(args) == 0
    first = capsys.readouterr().out
    assert prepare.main(args) == 0
    again = capsys.readouterr().out
    assert "nothing written" in again
    assert again[again.index("train:"):] == first[first.index("train:"):]  # the same report
    path = coco / "annotations" / "instances_train.json"
    edited = json.loads(path.read_text())
    edited["annotations"] = [a for a in edited["annotations"] if a["image_id"] != 1]
    path.write_text(json.dumps(edited))
    assert prepare.main(args) == 2
    assert "was prepared from another source" in capsys.readouterr().err
    assert prepare.main(args + ["--overwrite"]) == 0
    assert "wrote" in capsys.readouterr().out
    dataset_dir = tmp_path / "tfds" / "tiny" / coco_builder.DATASET_VERSION
    labels = [len(e["labels"]) for e in _by_id(DetectionSource(dataset_dir, "train")).values()]
    assert sum(labels) == len(edited["annotations"])
    (coco / "train" / "extra.jpg").write_bytes(b"x")  # the image list changed
    with pytest.raises(prepare.DatasetExists, match="--overwrite"):
        prepare.prepare(coco, "tiny", tmp_path / "tfds")
    assert sorted(p.name for p in (tmp_path / "tfds" / "tiny").iterdir()) == ["1.0.0"]
