"""The notebook API: preprocessing, bucketed compilation, checkpoints, drawing, attention."""

import jax
import matplotlib
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from ddetr_jax.checkpoints.loading import load_model
from ddetr_jax.convert import CheckpointMismatch, save_converted
from ddetr_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ddetr_jax.drawing import plot_attention
from ddetr_jax.images import load_image, prepare_batch
from ddetr_jax.inference import Detector
from ddetr_jax.models import DeformableDETR, ModelConfig
from ddetr_jax.postprocess import postprocess

matplotlib.use("Agg")

TINY = ModelConfig(backbone_depth=18, dim=64, ffn_dim=128, heads=4, enc_layers=1, dec_layers=2,
                   num_queries=12, num_classes=9)
SIZES = dict(shorter_side=128, longer_side=256, size_multiple=64)
NAMES = {1: "ellipse", 2: "rectangle", 3: "triangle"}


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def model():
    return DeformableDETR(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def detector(model):
    return Detector(model, NAMES, **SIZES)


def random_image(height, width, seed=0, channels=3):
    shape = (height, width) if channels is None else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_resized_size_follows_the_authors_resize():
    from ddetr_jax.data.transforms import resized_hw
    assert resized_hw((480, 640), 800, 1333) == (800, 1066)
    assert resized_hw((640, 480), 800, 1333) == (1066, 800)
    assert resized_hw((500, 1500), 800, 1333) == (444, 1332)  # longer side capped
    assert resized_hw((800, 1000), 800, 1333) == (800, 1000)  # already the right size
    assert resized_hw((100, 150), 128, None) == (128, 192)


def test_prepare_batch_normalises_pads_and_buckets():
    white = np.full((100, 150, 3), 255, np.uint8)
    batch = prepare_batch([white, random_image(60, 60)], 128, 256, 64)
    assert batch.pixels.shape == (2, 128, 192, 3)  # (128, 192) and (128, 128) -> one bucket
    np.testing.assert_array_equal(batch.orig_size, [[100, 150], [60, 60]])
    np.testing.assert_array_equal(batch.resized_size, [[128, 192], [128, 128]])
    np.testing.assert_allclose(batch.pixels[0, 5, 5], (1 - IMAGENET_MEAN) / IMAGENET_STD,
                               rtol=1e-5)
    assert not batch.pad_mask[1, :, :128].any() and batch.pad_mask[1, :, 128:].all()
    assert (batch.pixels[1, :, 128:] == 0).all()


def test_load_image_converts_every_kind(tmp_path):
    rgb = random_image(20, 30)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    rgba = random_image(20, 30, channels=4)
    gray = random_image(20, 30, channels=None)
    for image in (tmp_path / "a.png", str(tmp_path / "a.png"), Image.fromarray(rgb)):
        np.testing.assert_array_equal(load_image(image), rgb)
    for image in (gray, gray[..., None], Image.fromarray(gray)):
        out = load_image(image)
        assert out.shape == (20, 30, 3) and (out == gray[..., None]).all()
    for image in (rgba, Image.fromarray(rgba, "RGBA")):
        np.testing.assert_array_equal(load_image(image), rgba[..., :3])


def test_bad_images_are_refused(tmp_path):
    (tmp_path / "not_an_image.jpg").write_text("hello")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="cannot read"):
        load_image(tmp_path / "not_an_image.jpg")
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(TypeError, match="path, PIL image or uint8 array"):
        load_image(3)


def test_predict_equals_the_model_and_compiles_once_per_bucket(model, detector):
    image = random_image(100, 150)
    prediction = detector.predict(image, score_threshold=0.0)
    compiled = detector.compilations

    batch = prepare_batch([image], 128, 256, 64)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x, mask: nnx.merge(graphdef, state)(x, mask))
    out = forward(state, batch.pixels, batch.pad_mask)
    expected = postprocess(out["pred_logits"], out["pred_boxes"], batch.orig_size)
    np.testing.assert_allclose(prediction["scores"], expected["scores"][0], rtol=1e-4)
    np.testing.assert_allclose(prediction["boxes_xyxy"], expected["boxes_xyxy"][0], rtol=1e-4,
                               atol=1e-2)
    np.testing.assert_array_equal(prediction["labels"], expected["labels"][0])
    assert prediction["class_names"] == [NAMES.get(int(c), str(int(c)))
                                         for c in prediction["labels"]]

    # (110, 160) -> (128, 186) and a grayscale (90, 130) -> (128, 184): bucket (128, 192)
    detector.predict(random_image(110, 160, seed=1))
    detector.predict(random_image(90, 130, seed=2, channels=None))
    assert detector.compilations == compiled
    detector.predict(random_image(100, 190, seed=3))  # (128, 243) -> bucket (128, 256)
    assert detector.compilations == compiled + 1

    threshold = float(np.median(prediction["scores"]))
    kept = detector.predict(image, score_threshold=threshold)
    assert len(kept["scores"]) == int((prediction["scores"] >= threshold).sum())
    assert (kept["scores"] >= threshold).all()
    assert detector.compilations == compiled + 1


def test_nms_keeps_the_best_of_each_class_when_every_query_has_the_same_box(model):
    """With the reference-point head zeroed, every query predicts the same box (the
    box head's last layer starts at zero): NMS keeps one detection per class."""
    same_box = nnx.clone(model)
    kernel = same_box.reference_points.kernel
    kernel[...] = kernel[...] * 0
    image = random_image(100, 150, seed=6)
    everything = Detector(same_box, NAMES, **SIZES).predict(image, score_threshold=0.0)
    np.testing.assert_allclose(everything["boxes_xyxy"], everything["boxes_xyxy"][:1].repeat(
        len(everything["scores"]), 0), atol=1e-3)
    with_nms = Detector(same_box, NAMES, **SIZES, nms_iou=0.5).predict(image,
                                                                        score_threshold=0.0)
    labels = everything["labels"]
    best = [int(np.flatnonzero(labels == c)[0]) for c in dict.fromkeys(labels.tolist())]
    np.testing.assert_array_equal(with_nms["labels"], labels[best])
    np.testing.assert_array_equal(with_nms["queries"], everything["queries"][best])
    np.testing.assert_allclose(with_nms["scores"], everything["scores"][best], rtol=1e-6)
    with pytest.raises(ValueError, match="nms_iou"):
        Detector(model, NAMES, nms_iou=1.5)


def test_predict_many_images_equals_one_by_one(detector):
    images = [random_image(100, 150, seed=4), random_image(80, 120, seed=5, channels=4)]
    together = detector.predict(images, score_threshold=0.0)
    assert isinstance(together, list) and len(together) == 2
    alone = detector.predict(images[0], score_threshold=0.0)
    # Same bucket, no other image's padding in the way: identical up to float reassociation.
    np.testing.assert_allclose(together[0]["scores"], alone["scores"], rtol=1e-4)


def test_from_converted_checkpoint(model, detector, tmp_path):
    save_converted(model, TINY, str(tmp_path / "converted"))
    loaded = Detector.from_checkpoint(tmp_path / "converted", NAMES, **SIZES)
    image = random_image(100, 150, seed=6)
    a = loaded.predict(image, score_threshold=0.0)
    b = detector.predict(image, score_threshold=0.0)
    np.testing.assert_array_equal(a["scores"], b["scores"])
    np.testing.assert_array_equal(a["boxes_xyxy"], b["boxes_xyxy"])


def test_converted_checkpoint_loads_without_the_devices_that_wrote_it(tmp_path):
    """Written with the weights on CPU device 7 of this process's 8 (as a GPU machine
    writes GPU arrays), loaded in a process with one device: the same weights."""
    import os
    import subprocess
    import sys

    from ddetr_jax.convert import WEIGHTS
    model = DeformableDETR(TINY, rngs=nnx.Rngs(5))
    nnx.update(model, jax.device_put(nnx.state(model, WEIGHTS), jax.devices()[7]))
    save_converted(model, TINY, str(tmp_path / "converted"))
    expected = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, WEIGHTS)))
    np.savez(tmp_path / "expected.npz", *jax.tree.leaves(expected))
    script = (
        "import sys, jax, numpy as np; from flax import nnx\n"
        "from ddetr_jax.checkpoints.loading import load_converted\n"
        "from ddetr_jax.convert import WEIGHTS\n"
        "assert len(jax.devices()) == 1\n"
        "model, _ = load_converted(sys.argv[1])\n"
        "got = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, WEIGHTS)))\n"
        "want = np.load(sys.argv[2])\n"
        "assert len(got) == len(want.files)\n"
        "for i, g in enumerate(got): np.testing.assert_array_equal(g, want[f'arr_{i}'])\n")
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "converted"),
                             str(tmp_path / "expected.npz")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_checkpoint_with_one_subtree_per_layer_loads_stacked(tmp_path):
    """Checkpoints written before the layers were stacked ('layers': {'0': ..., '1': ...})
    load into the stacked model with the same weights."""
    import dataclasses
    import json

    import orbax.checkpoint as ocp

    from ddetr_jax.checkpoints.loading import load_converted
    from ddetr_jax.convert import WEIGHTS
    config = dataclasses.replace(TINY, enc_layers=2, with_box_refine=True, two_stage=True)
    model = DeformableDETR(config, rngs=nnx.Rngs(3))
    state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, WEIGHTS)))
    per_layer = lambda tree, n: {str(i): jax.tree.map(lambda x: x[i], tree)  # noqa: E731
                                 for i in range(n)}
    old = dict(state, encoder={"layers": per_layer(state["encoder"]["layers"], 2)},
               decoder={"layers": per_layer(state["decoder"]["layers"], 2)},
               class_embed=per_layer(state["class_embed"], 3),
               bbox_embed=per_layer(state["bbox_embed"], 3))
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "old" / "state", old)
    (tmp_path / "old" / "model_config.json").write_text(json.dumps(dataclasses.asdict(config)))
    loaded, _ = load_converted(str(tmp_path / "old"))
    expected = jax.tree.leaves(nnx.state(model, WEIGHTS))
    got = jax.tree.leaves(nnx.state(loaded, WEIGHTS))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_bad_checkpoints_are_refused(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointMismatch, match="none of the kinds"):
        load_model(tmp_path / "empty")
    (tmp_path / "weights.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointMismatch, match="weights.pth is not a PyTorch weights file"):
        load_model(tmp_path / "weights.pth")
    save_converted(model, TINY, str(tmp_path / "converted"))
    with pytest.raises(ValueError, match="fixes its model config"):
        load_model(tmp_path / "converted", heads=8)


def test_draw_marks_the_boxes(detector):
    image = np.zeros((100, 150, 3), np.uint8)
    prediction = {"boxes_xyxy": np.array([[10.0, 20.0, 110.0, 90.0]]),
                  "scores": np.array([0.9]), "labels": np.array([2]),
                  "class_names": ["rectangle"]}
    drawn = np.asarray(detector.draw(image, prediction))
    assert drawn.shape == image.shape
    assert drawn[50, 10].any() and drawn[50, 109].any() and drawn[89, 60].any()  # the edges
    assert not drawn[50, 60].any()  # the inside is untouched


def test_attention_points_land_on_the_reference_in_original_pixels(model):
    """With the layer-0 sampling offsets zeroed, every sampling point is the query's
    reference point: (sigmoid of the reference head) times the original image size."""
    zeroed = nnx.clone(model)
    bias = zeroed.decoder.layers.cross_attn.sampling_offsets.bias  # (dec_layers, ...) stacked
    bias[...] = bias[...].at[0].set(0)
    detector = Detector(zeroed, NAMES, **SIZES)
    image = random_image(256, 384, seed=7)  # -> (128, 192): every level's valid ratio is exact
    attention = detector.attention(image, layer=0, query=3)
    embed = zeroed.query_embed.embedding[...][:, :TINY.dim]
    reference = np.asarray(jax.nn.sigmoid(zeroed.reference_points(embed)))[3]  # (x, y)
    m, levels, points = TINY.heads, TINY.num_feature_levels, TINY.dec_points
    assert attention["points_xy"].shape == (m, levels, points, 2)
    expected = np.broadcast_to(reference * [384, 256], (m, levels, points, 2))
    np.testing.assert_allclose(attention["points_xy"], expected, rtol=1e-4)
    np.testing.assert_allclose(attention["weights"].sum((1, 2)), np.ones(m), rtol=1e-5)
    assert attention["query"] == 3 and attention["layer"] == 0


def test_attention_defaults_to_the_best_detection_and_plots(detector):
    image = random_image(100, 150, seed=8)
    best = detector.predict(image, score_threshold=0.0)
    attention = detector.attention(image)
    assert attention["layer"] == TINY.dec_layers - 1
    assert attention["query"] == best["queries"][0]
    np.testing.assert_allclose(attention["box_xyxy"], best["boxes_xyxy"][0], rtol=1e-4,
                               atol=1e-2)
    assert attention["class_name"] == best["class_names"][0]
    ax = plot_attention(image, attention)
    assert len(ax.collections) == TINY.num_feature_levels  # one scatter per level
    with pytest.raises(ValueError, match="layer"):
        detector.attention(image, layer=2)
    with pytest.raises(ValueError, match="query"):
        detector.attention(image, query=12)


def test_hf_model_directory_and_weights_file(tmp_path):
    """save_pretrained output (a directory) and its model.safetensors load alike."""
    import torch
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    torch.manual_seed(0)
    config = DeformableDetrConfig(
        num_labels=9, use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=ResNetConfig(depths=[2, 2, 2, 2], layer_type="basic",
                                     hidden_sizes=[64, 128, 256, 512],
                                     out_features=["stage2", "stage3", "stage4"]),
        d_model=64, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=128,
        decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4,
        num_queries=12)
    hf = DeformableDetrForObjectDetection(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    expected = hf.class_embed[0].weight.detach().numpy().T  # (D, C)
    for path in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors"):
        model = load_model(path, heads=4)
        assert model.config == TINY
        np.testing.assert_array_equal(model.class_embed.kernel[...], expected)
