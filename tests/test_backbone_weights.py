"""ImageNet ResNet weights (torchvision names) into the backbone: convert.load_backbone_weights,
and the group-norm backbone for training from scratch."""

import jax
import numpy as np
import pytest
from flax import nnx

from ddetr_jax.convert import CheckpointMismatch, load_backbone_weights
from ddetr_jax.models import DeformableDETR, ModelConfig
from ddetr_jax.optimizer import OptimizerConfig, make_optimizer, param_group

SMALL = dict(backbone_depth=18, dim=32, ffn_dim=64, heads=2, enc_layers=1, dec_layers=1,
             num_queries=5, num_classes=4)


def torchvision_resnet18_state_dict(seed=0):
    """Random arrays under torchvision's resnet18 names and (O, I, kh, kw) conv layout."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(name, o, i, k):
        sd[f"{name}.weight"] = rng.normal(size=(o, i, k, k)).astype(np.float32)

    def bn(name, c):
        for stat in ("weight", "bias", "running_mean", "running_var"):
            sd[f"{name}.{stat}"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.array(7)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    in_c = 64
    for layer, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{layer}.{block}"
            conv(f"{prefix}.conv1", width, in_c if block == 0 else width, 3)
            bn(f"{prefix}.bn1", width)
            conv(f"{prefix}.conv2", width, width, 3)
            bn(f"{prefix}.bn2", width)
            if block == 0 and layer > 1:
                conv(f"{prefix}.downsample.0", width, in_c, 1)
                bn(f"{prefix}.downsample.1", width)
        in_c = width
    sd["fc.weight"] = rng.normal(size=(1000, 512)).astype(np.float32)
    sd["fc.bias"] = np.zeros(1000, np.float32)
    return sd


def test_loads_every_backbone_weight_in_place():
    model = DeformableDETR(ModelConfig(**SMALL), rngs=nnx.Rngs(0))
    sd = torchvision_resnet18_state_dict()
    ignored = load_backbone_weights(model, sd)
    assert sorted(ignored) == ["fc.bias", "fc.weight"]
    bb = model.backbone
    np.testing.assert_array_equal(bb.stem.conv.kernel[...],
                                  sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(bb.layers[2][0].downsample.conv.kernel[...],
                                  sd["layer3.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(bb.layers[3][1].conv2.bn.running_var[...],
                                  sd["layer4.1.bn2.running_var"])


def test_mismatches_are_listed_together():
    model = DeformableDETR(ModelConfig(**SMALL), rngs=nnx.Rngs(0))
    sd = torchvision_resnet18_state_dict()
    del sd["layer2.0.conv1.weight"]
    sd["layer1.0.bn1.weight"] = np.ones(3, np.float32)
    with pytest.raises(CheckpointMismatch) as error:
        load_backbone_weights(model, sd)
    assert "backbone.layers.1.0.conv1.conv.kernel: missing" in str(error.value)
    assert "backbone.layers.0.0.conv1.bn.weight: checkpoint shape (3,)" in str(error.value)
    gn = DeformableDETR(ModelConfig(**SMALL, backbone_norm="group_norm"), rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointMismatch, match="bn.running_mean"):
        load_backbone_weights(gn, torchvision_resnet18_state_dict())


def test_group_norm_backbone_trains_every_stage():
    config = ModelConfig(**SMALL, backbone_norm="group_norm", backbone_width=32)
    model = DeformableDETR(config, rngs=nnx.Rngs(0))
    assert model.backbone.channels == (64, 128, 256)
    assert model.backbone.stem.bn.num_groups == 8  # at least 4 channels per group
    images = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
    pad_mask = np.zeros((1, 64, 64), bool)

    def loss(m):
        return m(images, pad_mask)["pred_boxes"].sum() + m(images, pad_mask)["pred_logits"].sum()

    grads = nnx.grad(loss)(model)
    assert float(np.abs(grads["backbone"]["stem"]["conv"]["kernel"][...]).sum()) > 0
    assert param_group(("backbone", "stem", "conv", "kernel"), freeze_stem=False) == "backbone"
    params = nnx.state(model, nnx.Param)
    tx, _ = make_optimizer(params, OptimizerConfig(freeze_stem=False))
    assert jax.tree.leaves(tx.init(params))  # every group has state; none is frozen
    with pytest.raises(ValueError, match="norm: expected one of"):
        DeformableDETR(ModelConfig(**SMALL, backbone_norm="batch_norm"), rngs=nnx.Rngs(0))
