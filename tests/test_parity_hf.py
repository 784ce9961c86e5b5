"""Parity: HuggingFace DeformableDetrForObjectDetection (random weights) vs the converted JAX model.

Both run in eval mode on one batch of two images of different sizes padded
into one tensor, so masks, valid ratios and padding are exercised. Transformer
depth is reduced to 2 + 2 layers to keep CI fast; every code path (aux
outputs, refinement from layer 1 on, two-stage) is still taken.
"""

import argparse
import copy
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

from ddetr_jax.checkpoints.loading import load_converted
from ddetr_jax.convert import WEIGHTS, CheckpointMismatch, load_torch_checkpoint, main

HEIGHT, WIDTH = 96, 128
VARIANTS = {
    "single_scale": dict(num_feature_levels=1),
    "multi_scale": dict(num_feature_levels=4),
    "box_refine": dict(num_feature_levels=4, with_box_refine=True),
    "two_stage": dict(num_feature_levels=4, with_box_refine=True, two_stage=True),
}


def build_hf(variant: str, seed: int = 0):
    """A random HF model with non-trivial BN statistics, biases and zero-initialised weights."""
    torch.manual_seed(seed)
    kwargs = VARIANTS[variant]
    out_features = ["stage4"] if kwargs["num_feature_levels"] == 1 else ["stage2", "stage3",
                                                                           "stage4"]
    config = DeformableDetrConfig(
        num_labels=91, use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=ResNetConfig(out_features=out_features), encoder_layers=2,
        decoder_layers=2, num_queries=30, two_stage_num_proposals=30, **kwargs)
    model = DeformableDetrForObjectDetection(config).eval()
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                tensor.normal_(0, 0.1)
            elif "normalization.weight" in name:
                tensor.uniform_(0.5, 1.5)
            elif tensor.ndim == 1:
                tensor.add_(torch.randn_like(tensor) * 0.1)
            elif bool((tensor == 0).all()):
                tensor.normal_(0, 0.02)
    return model


def make_batch(seed: int = 0):
    """Two images (96x128 and 72x100) padded into one (2, 96, 128) batch."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(2, HEIGHT, WIDTH, 3)).astype(np.float32)
    pad_mask = np.zeros((2, HEIGHT, WIDTH), bool)
    pad_mask[1, 72:, :] = True
    pad_mask[1, :, 100:] = True
    images[pad_mask] = 0
    return images, pad_mask


def run_hf(model, images, pad_mask):
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(images).permute(0, 3, 1, 2),
                    pixel_mask=torch.tensor(~pad_mask).long())
    return out.logits.numpy(), out.pred_boxes.numpy()


def run_jax(model, images, pad_mask):
    out = nnx.jit(lambda m, x, mk: m(x, mk))(model, images, pad_mask)
    return np.asarray(out["pred_logits"]), np.asarray(out["pred_boxes"]), out


@pytest.fixture(scope="module")
def batch():
    return make_batch()


def authors_layout(hf_state: dict, refine: bool, num_pred: int) -> dict:
    """The authors' key names from HF's, written from the published renaming table."""
    out = {}
    for key, value in hf_state.items():
        k = key
        if k.startswith("model.backbone."):
            k = k.replace("model.backbone.model.", "backbone.0.body.")
            k = k.replace("embedder.embedder.convolution", "conv1")
            k = k.replace("embedder.embedder.normalization", "bn1")
            parts = k.split(".")
            if parts[3] == "encoder":  # backbone.0.body.encoder.stages.S.layers.B.rest
                stage, block = int(parts[5]), parts[7]
                rest = ".".join(parts[8:])
                rest = rest.replace("shortcut.convolution", "downsample.0")
                rest = rest.replace("shortcut.normalization", "downsample.1")
                for i in range(3):
                    rest = rest.replace(f"layer.{i}.convolution", f"conv{i + 1}")
                    rest = rest.replace(f"layer.{i}.normalization", f"bn{i + 1}")
                k = f"backbone.0.body.layer{stage + 1}.{block}.{rest}"
        elif k.startswith("model."):
            k = k[len("model."):]
            k = k.replace("query_position_embeddings", "query_embed")
            if not k.startswith(("input_proj", "query_embed")):
                k = "transformer." + k
            if ".encoder.layers." in k:
                k = k.replace("self_attn_layer_norm", "norm1").replace("final_layer_norm", "norm2")
            else:
                k = k.replace("encoder_attn_layer_norm", "norm1")
                k = k.replace("self_attn_layer_norm", "norm2").replace("final_layer_norm", "norm3")
                k = k.replace("encoder_attn", "cross_attn").replace("o_proj", "out_proj")
            k = k.replace("mlp.fc1", "linear1").replace("mlp.fc2", "linear2")
        out[k] = value
    for layer in {k.split(".")[3] for k in out if ".decoder.layers." in k}:
        prefix = f"transformer.decoder.layers.{layer}.self_attn."
        for kind in ("weight", "bias"):
            out[prefix + f"in_proj_{kind}"] = torch.cat(
                [out.pop(prefix + f"{p}_proj.{kind}") for p in "qkv"])
    if refine:
        for key in [k for k in out if k.startswith("bbox_embed.")]:
            out["transformer.decoder." + key] = out[key].clone()
    else:
        for i in range(1, num_pred):
            for key in [k for k in out if k.startswith(("class_embed.0.", "bbox_embed.0."))]:
                out[key.replace(".0.", f".{i}.", 1)] = out[key].clone()
    out["backbone.0.body.total_params"] = torch.tensor([1.0])
    out["total_ops"] = torch.tensor([1.0])
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_converted_hf_model_matches(variant, batch):
    hf = build_hf(variant)
    images, pad_mask = batch
    hf_logits, hf_boxes = run_hf(hf, images, pad_mask)
    # Two-stage checkpoints hold no query embedding: the query count is a choice.
    overrides = {"num_queries": 30} if variant == "two_stage" else {}
    model, info = load_torch_checkpoint(hf.state_dict(), **overrides)
    assert info["layout"] == "huggingface"
    assert info["unused_keys"] == []
    logits, boxes, out = run_jax(model, images, pad_mask)
    np.testing.assert_allclose(logits, hf_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(boxes, hf_boxes, atol=1e-4, rtol=0)
    assert len(out["aux_outputs"]) == 1
    assert ("enc_outputs" in out) == (variant == "two_stage")


def test_authors_layout_pth_converts_to_the_same_model(batch, tmp_path):
    hf = build_hf("box_refine", seed=1)
    images, pad_mask = batch
    hf_logits, hf_boxes = run_hf(hf, images, pad_mask)
    state = authors_layout(hf.state_dict(), refine=True, num_pred=2)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "epoch": 3}, path)
    model, info = load_torch_checkpoint(str(path))
    assert info["layout"] == "authors"
    assert info["config"].with_box_refine and info["config"].num_feature_levels == 4
    logits, boxes, _ = run_jax(model, images, pad_mask)
    np.testing.assert_allclose(logits, hf_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(boxes, hf_boxes, atol=1e-4, rtol=0)


def test_shared_heads_in_authors_layout_and_round_trip_through_cli(batch, tmp_path):
    hf = build_hf("multi_scale", seed=2)
    images, pad_mask = batch
    hf_logits, _ = run_hf(hf, images, pad_mask)
    state = authors_layout(hf.state_dict(), refine=False, num_pred=2)
    src = tmp_path / "bare_state_dict.pth"
    torch.save(state, src)
    assert main([str(src), str(tmp_path / "converted")]) == 0
    model, config = load_converted(str(tmp_path / "converted"))
    assert config.num_feature_levels == 4 and not config.with_box_refine
    logits, _, _ = run_jax(model, images, pad_mask)
    np.testing.assert_allclose(logits, hf_logits, atol=1e-4, rtol=0)


def test_contradicting_config_lists_every_mismatch():
    state = build_hf("multi_scale").state_dict()
    with pytest.raises(CheckpointMismatch) as info:
        load_torch_checkpoint(state, num_classes=20, num_feature_levels=3, dim=128)
    message = str(info.value)
    for field in ("num_classes", "num_feature_levels", "dim"):
        assert f"config.{field}" in message


def test_wrong_shapes_are_all_reported():
    state = build_hf("multi_scale").state_dict()
    state["model.level_embed"] = torch.zeros(4, 256)
    state["class_embed.0.bias"] = torch.zeros(7)
    del state["model.reference_points.weight"]
    with pytest.raises(CheckpointMismatch) as info:
        load_torch_checkpoint(state, heads=8)
    message = str(info.value)
    assert "reference_points.kernel: missing" in message
    assert "class_embed.bias: checkpoint shape (7,)" in message


def test_unreadable_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_torch_checkpoint(str(tmp_path / "missing.pth"))
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatch, match="corrupt.pth is not a PyTorch weights file"):
        load_torch_checkpoint(str(bad))
    with pytest.raises(CheckpointMismatch, match="neither the authors' layout"):
        load_torch_checkpoint({"foo.weight": np.zeros(3)})


def test_jax_model_is_jittable_under_grad(batch):
    """The converted model trains: finite gradients for every parameter."""
    model, _ = load_torch_checkpoint(build_hf("single_scale").state_dict())
    images, pad_mask = batch
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        out = nnx.merge(graphdef, p, rest)(images, pad_mask)
        return out["pred_boxes"].sum() + jax.nn.sigmoid(out["pred_logits"]).mean()

    grads = jax.jit(jax.grad(loss))(params)
    assert all(bool(np.isfinite(g).all()) for g in jax.tree.leaves(grads))



def test_duplicated_heads_must_agree():
    state = authors_layout(build_hf("multi_scale").state_dict(), refine=False, num_pred=2)
    state["class_embed.1.bias"] = state["class_embed.1.bias"] + 1
    with pytest.raises(CheckpointMismatch, match="class_embed.1.bias: differs from class_embed.0"):
        load_torch_checkpoint(state)


def test_safetensors_file_and_old_hf_key_names(batch, tmp_path):
    """save_pretrained's model.safetensors, and a .bin with the older HF key names."""
    hf = build_hf("multi_scale", seed=3)
    images, pad_mask = batch
    hf_logits, _ = run_hf(hf, images, pad_mask)
    hf.save_pretrained(tmp_path / "hf")
    model, info = load_torch_checkpoint(str(tmp_path / "hf" / "model.safetensors"))
    assert info["layout"] == "huggingface"
    np.testing.assert_allclose(run_jax(model, images, pad_mask)[0], hf_logits, atol=1e-4, rtol=0)
    old = {k.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
            .replace("mlp.fc", "fc").replace("o_proj", "out_proj"): v
           for k, v in hf.state_dict().items()}
    torch.save(old, tmp_path / "pytorch_model.bin")
    model, _ = load_torch_checkpoint(str(tmp_path / "pytorch_model.bin"))
    np.testing.assert_allclose(run_jax(model, images, pad_mask)[0], hf_logits, atol=1e-4, rtol=0)


def authors_args(**changes) -> argparse.Namespace:
    """The 'args' of an authors' main.py checkpoint (their argument names) for build_hf's
    2 + 2-layer multi-scale model."""
    args = dict(lr=2e-4, lr_backbone=2e-5, batch_size=2, weight_decay=1e-4, epochs=50,
                lr_drop=40, clip_max_norm=0.1, with_box_refine=False, two_stage=False,
                backbone="resnet50", dilation=False, position_embedding="sine",
                num_feature_levels=4, enc_layers=2, dec_layers=2, dim_feedforward=1024,
                hidden_dim=256, dropout=0.1, nheads=8, num_queries=30, dec_n_points=4,
                enc_n_points=4, masks=False, aux_loss=True, focal_alpha=0.25,
                dataset_file="coco", coco_path="./data/coco", output_dir="exps/r50")
    return argparse.Namespace(**{**args, **changes})


def save_main_py_checkpoint(hf, state: dict, args: argparse.Namespace, path) -> None:
    """What the authors' main.py writes: model, a real AdamW and StepLR state, epoch, args.
    The optimizer steps a copy of hf, so `state` keeps the weights it was given."""
    trained = copy.deepcopy(hf)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=args.lr,
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    sum((p ** 2).sum() for p in trained.parameters()).backward()
    optimizer.step()
    scheduler.step()
    torch.save({"model": state, "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "epoch": 49, "args": args}, path)


def _weights(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, WEIGHTS))


def _assert_same_weights(a, b):
    jax.tree.map(np.testing.assert_array_equal, _weights(a), _weights(b))


def test_authors_main_py_checkpoint_converts_to_its_bare_state_dicts_weights(tmp_path):
    hf = build_hf("multi_scale", seed=4)
    state = authors_layout(hf.state_dict(), refine=False, num_pred=2)
    bare, _ = load_torch_checkpoint(state)
    path = tmp_path / "checkpoint0049.pth"
    save_main_py_checkpoint(hf, state, authors_args(), path)
    model, info = load_torch_checkpoint(str(path))
    _assert_same_weights(model, bare)
    assert info["config"] == bare.config
    assert info["from_args"]["heads"] == 8 and info["overridden"] == {}
    assert main([str(path), str(tmp_path / "converted")]) == 0
    converted, config = load_converted(str(tmp_path / "converted"))
    _assert_same_weights(converted, bare)
    assert config == bare.config


def test_dc5_and_two_stage_settings_come_from_the_args(batch, tmp_path):
    hf = build_hf("single_scale", seed=5)
    state = authors_layout(hf.state_dict(), refine=False, num_pred=2)
    save_main_py_checkpoint(hf, state, authors_args(num_feature_levels=1, dilation=True),
                            tmp_path / "dc5.pth")
    model, info = load_torch_checkpoint(str(tmp_path / "dc5.pth"))
    assert info["config"].dilation and info["config"].num_feature_levels == 1
    _assert_same_weights(model, load_torch_checkpoint(state, dilation=True)[0])

    hf = build_hf("two_stage", seed=6)
    images, pad_mask = batch
    hf_logits, hf_boxes = run_hf(hf, images, pad_mask)
    state = authors_layout(hf.state_dict(), refine=True, num_pred=3)
    save_main_py_checkpoint(hf, state, authors_args(with_box_refine=True, two_stage=True),
                            tmp_path / "two_stage.pth")
    assert main([str(tmp_path / "two_stage.pth"), str(tmp_path / "converted")]) == 0
    model, config = load_converted(str(tmp_path / "converted"))
    assert config.two_stage and config.num_queries == 30
    logits, boxes, _ = run_jax(model, images, pad_mask)
    np.testing.assert_allclose(logits, hf_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(boxes, hf_boxes, atol=1e-4, rtol=0)


def test_args_that_contradict_the_weights_are_all_listed(tmp_path):
    hf = build_hf("multi_scale", seed=4)
    state = authors_layout(hf.state_dict(), refine=False, num_pred=2)
    path = tmp_path / "checkpoint.pth"
    save_main_py_checkpoint(hf, state, authors_args(num_feature_levels=3, enc_layers=6,
                                                    backbone="resnet101"), path)
    with pytest.raises(CheckpointMismatch) as err:
        load_torch_checkpoint(str(path))
    message = str(err.value)
    for field in ("num_feature_levels", "enc_layers", "backbone"):
        assert f"args.{field}" in message, field


def test_an_override_wins_over_the_args_and_is_reported(tmp_path, capsys):
    hf = build_hf("single_scale", seed=5)
    state = authors_layout(hf.state_dict(), refine=False, num_pred=2)
    path = tmp_path / "checkpoint.pth"
    save_main_py_checkpoint(hf, state, authors_args(num_feature_levels=1, nheads=8), path)
    # 4 heads of 8 points have the shapes of 8 heads of 4 points.
    model, info = load_torch_checkpoint(str(path), heads=4, enc_points=8, dec_points=8)
    assert model.config.heads == 4 and model.config.enc_points == 8
    assert info["overridden"] == {"heads": (8, 4), "enc_points": (4, 8), "dec_points": (4, 8)}
    assert main([str(path), str(tmp_path / "converted"), "--heads", "4", "--enc_points", "8",
                 "--dec_points", "8"]) == 0
    assert "override: heads = 4 (the checkpoint's args say 8)" in capsys.readouterr().out


class _Payload:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("beside_args", [False, True], ids=["alone", "beside_a_namespace"])
def test_a_pickled_payload_is_refused_before_it_runs(tmp_path, beside_args):
    marker = tmp_path / "ran"
    checkpoint = {"model": {"transformer.level_embed": torch.zeros(4, 256)},
                  "payload": _Payload(marker)}
    if beside_args:
        checkpoint["args"] = authors_args()
    torch.save(checkpoint, tmp_path / "evil.pth")
    with pytest.raises(CheckpointMismatch, match="cannot read .*evil.pth") as err:
        load_torch_checkpoint(str(tmp_path / "evil.pth"))
    assert not marker.exists()
    assert "system" in str(err.value) and "weights_only=False" not in str(err.value)


def test_a_file_that_torch_save_did_not_write_is_named(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello world, not a checkpoint\n")
    with pytest.raises(CheckpointMismatch, match=r"notes.pth is not a PyTorch weights file"):
        load_torch_checkpoint(str(path))
