"""evaluate.py's library (evaluation/run.py) and the training-workdir checkpoint kind."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddetr_jax.checkpoints.loading import load_workdir_model
from ddetr_jax.config import run_config
from ddetr_jax.convert import CheckpointMismatch
from ddetr_jax.evaluation.coco import METRICS
from ddetr_jax.evaluation.run import config_for_checkpoint as evaluate_checkpoint_config
from ddetr_jax.evaluation.run import evaluate_checkpoint
from ddetr_jax.inference import Detector
from ddetr_jax.train import loop
from tests.train_fixtures import TINY_DATA, load_config, make_tiny, prepare_tiny_data


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny quickstart run of 3 steps, evaluated at steps 2 and 3: (config, workdir)."""
    base = tmp_path_factory.mktemp("evaluate")
    prepare_tiny_data(base / "data")
    config = make_tiny(load_config("configs/quickstart.py"), base / "data", total_steps=3)
    config.model.num_queries = 12
    config.eval_every_steps = 2
    loop.train(config, base / "run")
    return config, base / "run"


def _eval_records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "eval/AP" in r}


def test_workdir_evaluation_equals_the_training_evaluation(trained, tmp_path):
    """Without a config: the workdir's own (its data, model and NMS); metrics.json names
    the dataset it read."""
    config, workdir = trained
    metrics = evaluate_checkpoint(None, workdir, tmp_path, num_draw=2, score_threshold=0.0)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert set(METRICS) | {"per_class"} <= set(written)
    assert written["step"] == 3 and written["num_images"] == TINY_DATA["val_images"]
    assert (written["dataset"], written["split"]) == (TINY_DATA["name"], "validation")
    assert written["dataset_dir"] == str(Path(config.data.data_dir) / TINY_DATA["name"] / "1.0.0")
    during_training = _eval_records(workdir)[3]
    for name in METRICS:
        assert written[name] == pytest.approx(during_training[f"eval/{name}"], abs=1e-12), name
    assert [c["name"] for c in written["per_class"]] == ["ellipse", "rectangle", "triangle",
                                                        "cross", "star", "ring"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert config.eval_nms_iou == 0.5  # the quickstart's NMS
    assert 0 < len(results) <= TINY_DATA["val_images"] * min(100, 12 * 9)
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    assert max_same_class_iou(results) <= 0.5 and min(r["score"] for r in results) > 0
    assert len(list((tmp_path / "images").glob("*.png"))) == 2
    assert metrics["AP"] == written["AP"]


def max_same_class_iou(results) -> float:
    """The largest IoU between two results of one image and one class."""
    groups = {}
    for r in results:
        groups.setdefault((r["image_id"], r["category_id"]), []).append(r["bbox"])
    largest = 0.0
    for boxes in groups.values():
        xywh = np.asarray(boxes, np.float64)
        lo, hi = xywh[:, :2], xywh[:, :2] + xywh[:, 2:]
        wh = np.clip(np.minimum(hi[:, None], hi[None]) - np.maximum(lo[:, None], lo[None]), 0,
                     None)
        inter = wh[..., 0] * wh[..., 1]
        area = xywh[:, 2] * xywh[:, 3]
        iou = inter / np.maximum(area[:, None] + area[None] - inter, 1e-12)
        np.fill_diagonal(iou, 0)
        largest = max(largest, float(iou.max()))
    return largest


def test_nms_threshold_reaches_the_evaluation(trained, tmp_path):
    """eval_nms_iou=0 writes every top detection; a small threshold leaves out every
    same-class pair that overlaps more (on 8 devices: NMS inside the shard_map)."""
    config, workdir = trained
    results = {}
    for threshold in (0.0, 0.01):
        config = config.copy_and_resolve_references()
        config.eval_nms_iou = threshold
        evaluate_checkpoint(config, workdir, tmp_path / str(threshold))
        results[threshold] = json.loads((tmp_path / str(threshold) / "results.json").read_text())
    assert len(results[0.0]) == TINY_DATA["val_images"] * min(100, 12 * 9)
    assert max_same_class_iou(results[0.0]) > 0.01
    assert len(results[0.01]) < len(results[0.0])
    assert max_same_class_iou(results[0.01]) <= 0.01
    for kept in results[0.01]:  # each one is among the detections without NMS
        assert any(r["image_id"] == kept["image_id"] and r["category_id"] == kept["category_id"]
                   and np.allclose(r["bbox"], kept["bbox"], atol=1e-3) for r in results[0.0])


def test_best_checkpoint_and_step_folders(trained, tmp_path):
    config, workdir = trained
    evals = _eval_records(workdir)
    best = max(evals, key=lambda s: (evals[s]["eval/AP"], s))
    written = evaluate_checkpoint(config, workdir, tmp_path, which="best")
    assert written["step"] == best
    model, info = load_workdir_model(workdir / "checkpoints" / "2")
    assert info["step"] == 2 and model.config.num_queries == 12


def test_detector_reads_a_workdir(trained):
    """The run's validation resize and its dataset's class names, not 800 / 1333 and ids."""
    config, workdir = trained
    detector = Detector.from_checkpoint(workdir, size_multiple=64)
    assert (detector.shorter_side, detector.longer_side) == (config.data.val_scale,
                                                             config.data.max_size) == (48, 60)
    assert detector.class_names == {1: "ellipse", 2: "rectangle", 3: "triangle", 5: "cross",
                                    7: "star", 8: "ring"}
    prediction = detector.predict(np.zeros((50, 70, 3), np.uint8), score_threshold=0.0)
    assert prediction["boxes_xyxy"].shape == (100, 4)
    assert set(prediction["class_names"]) <= set(detector.class_names.values()) | {
        str(i) for i in range(9) if i not in detector.class_names}
    assert Detector.from_checkpoint(workdir, {1: "one"}, shorter_side=32).class_names == {
        1: "one"}


def test_a_config_with_other_data_than_the_run_is_refused(trained, tmp_path):
    """Another dataset or other synthetic parameters than the run's: every field listed
    before anything is loaded; a moved data_dir is not a contradiction."""
    config, workdir = trained
    other = config.copy_and_resolve_references()
    other.data.name = other.data.synthetic.name = "synthetic_shapes"
    other.data.synthetic.train_images = 2000
    with pytest.raises(run_config.ConfigMismatch) as error:
        evaluate_checkpoint(other, workdir / "checkpoints" / "2", tmp_path)
    message = str(error.value)
    for line in ("data.name: saved 'tiny_shapes', now 'synthetic_shapes'",
                 "data.synthetic.name: saved 'tiny_shapes', now 'synthetic_shapes'",
                 "data.synthetic.train_images: saved 24, now 2000", "Leave out --config"):
        assert line in message
    moved = config.copy_and_resolve_references()
    moved.data.data_dir = str(tmp_path / "elsewhere")
    assert evaluate_checkpoint_config(moved, workdir) is moved
    with pytest.raises(ValueError, match="give --config"):
        evaluate_checkpoint(None, tmp_path / "missing.pth", tmp_path / "out")


def test_config_that_contradicts_the_checkpoint(trained, tmp_path):
    config, workdir = trained
    other = make_tiny(load_config("configs/quickstart.py"), config.data.data_dir)
    other.model.num_queries = 7
    with pytest.raises(CheckpointMismatch, match="model.num_queries: checkpoint 12, config 7"):
        evaluate_checkpoint(other, workdir, tmp_path)


def test_bad_inputs_are_named(trained, tmp_path):
    config, workdir = trained
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_checkpoint(config, tmp_path / "missing.pth", tmp_path / "out")
    with pytest.raises(ValueError, match="no split 'test'"):
        evaluate_checkpoint(config, workdir, tmp_path / "out", split="test")
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.json").write_text((workdir / "config.json").read_text())
    with pytest.raises(CheckpointMismatch, match="no checkpoint to load"):
        evaluate_checkpoint(config, empty, tmp_path / "out")
    moved = config.copy_and_resolve_references()
    moved.data.data_dir = str(tmp_path / "no_data")
    moved.data.synthetic = {}  # the run's dataset was synthetic: a contradiction
    with pytest.raises(run_config.ConfigMismatch, match="data.synthetic.name: saved "
                                                        "'tiny_shapes', now '<absent>'"):
        evaluate_checkpoint(moved, workdir, tmp_path / "out")


def test_converted_random_hf_checkpoint(trained, tmp_path):
    from tests.test_parity_hf import build_hf
    config, _ = trained
    build_hf("multi_scale").save_pretrained(tmp_path / "hf")
    hf_config = make_tiny(load_config("configs/r50_deformable_detr.py"), config.data.data_dir)
    hf_config.model.update(dict(backbone_depth=50, dim=256, ffn_dim=1024, heads=8,
                                enc_layers=2, dec_layers=2, enc_points=4, dec_points=4,
                                num_queries=30))
    written = evaluate_checkpoint(hf_config, tmp_path / "hf", tmp_path / "out")
    assert written["num_images"] == TINY_DATA["val_images"] and -1 <= written["AP"] <= 1
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results) == TINY_DATA["val_images"] * 100


def test_cli_reports_a_mismatch_in_one_line(trained, tmp_path):
    config, workdir = trained
    config_file = tmp_path / "other.py"
    config_file.write_text(
        "import sys\nsys.path.insert(0, '.')\n"
        "from tests.train_fixtures import load_config, make_tiny\n\n\ndef get_config():\n"
        f"    c = make_tiny(load_config('configs/quickstart.py'), {config.data.data_dir!r})\n"
        "    c.model.dim = 48\n    return c\n")
    done = subprocess.run([sys.executable, "evaluate.py", f"--config={config_file}",
                           f"--checkpoint={workdir}", f"--output={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "error: checkpoint" in done.stderr and "model.dim: checkpoint 32, config 48" in \
        done.stderr


def test_notebook_runs_on_a_training_workdir(trained, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from tests.test_notebook import NOTEBOOK
    _, workdir = trained
    monkeypatch.setenv("DDETR_CHECKPOINT", str(workdir))
    monkeypatch.setenv("DDETR_WORKDIR", str(tmp_path))
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert "num_queries=12" in "".join(o.get("data", {}).get("text/plain", "")
                                       for o in outputs if o.output_type == "execute_result")
    assert not (tmp_path / "converted").exists()  # the workdir was used, nothing converted


def test_relative_workdir_path(trained, tmp_path, monkeypatch):
    """As the README runs it: --checkpoint runs/quickstart, relative to the working directory."""
    config, workdir = trained
    monkeypatch.chdir(workdir.parent)
    written = evaluate_checkpoint(config, workdir.name, "relative_out")
    assert written["step"] == 3 and (workdir.parent / "relative_out" / "metrics.json").exists()
