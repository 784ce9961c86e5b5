"""DeformableDETR structure: published parameter counts, variants, contract, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddetr_jax.models import DeformableDETR, ModelConfig, count_parameters
from ddetr_jax.models.attention import sampling_offset_bias
from ddetr_jax.models.backbone import _max_pool_3x3_s2, nearest_indices
from ddetr_jax.models.conv import conv_or_matmul
from ddetr_jax.models.dropout import Dropout, keep_mask


def abstract(**kwargs):
    return nnx.eval_shape(lambda: DeformableDETR(ModelConfig(**kwargs), rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("kwargs, expected, published", [
    (dict(num_feature_levels=1), 34_066_593, 34),
    (dict(num_feature_levels=1, dilation=True), 34_066_593, 34),
    (dict(), 40_069_665, 40),
    (dict(with_box_refine=True), 40_849_660, 41),
    (dict(with_box_refine=True, two_stage=True), 41_181_529, 41),
])
def test_parameter_counts_equal_the_published_ones(kwargs, expected, published):
    """Exact counts: HF's for single-scale, multi-scale and two-stage; refinement has
    6 independent class heads as in the authors' code (HF ties them: 40,732,725)."""
    count = count_parameters(abstract(**kwargs))
    assert count == expected
    assert round(count / 1e6) == published


TINY = dict(backbone_depth=18, dim=64, ffn_dim=128, heads=4, enc_layers=1, dec_layers=2,
            num_queries=12)


@pytest.mark.parametrize("variant", [
    dict(num_feature_levels=1), dict(num_feature_levels=1, dilation=True), dict(),
    dict(with_box_refine=True), dict(with_box_refine=True, two_stage=True)])
def test_every_variant_runs_and_keeps_the_output_contract(variant):
    model = DeformableDETR(ModelConfig(**TINY, **variant), rngs=nnx.Rngs(0))
    images = jnp.ones((2, 64, 96, 3))
    pad_mask = jnp.zeros((2, 64, 96), bool).at[1, 48:].set(True)
    out = nnx.jit(lambda m, x, k: m(x, k))(model, images, pad_mask)
    assert out["pred_logits"].shape == (2, 12, 91)
    assert out["pred_boxes"].shape == (2, 12, 4)
    assert len(out["aux_outputs"]) == 1
    assert ("enc_outputs" in out) == variant.get("two_stage", False)
    boxes = np.asarray(out["pred_boxes"])
    assert np.all((boxes >= 0) & (boxes <= 1))


def test_two_stage_on_an_image_with_fewer_tokens_than_queries_says_so():
    config = ModelConfig(**{**TINY, "num_queries": 300}, with_box_refine=True, two_stage=True)
    model = DeformableDETR(config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"the image gives 128 encoder tokens .* fewer than "
                                         r"the model.num_queries=300"):
        nnx.eval_shape(lambda m: m(jnp.ones((1, 64, 96, 3)), jnp.zeros((1, 64, 96), bool)),
                       model)


def test_dc5_is_stride_16():
    model = DeformableDETR(ModelConfig(**TINY, num_feature_levels=1, dilation=True),
                           rngs=nnx.Rngs(0))
    sources, masks, _ = model.features(jnp.ones((1, 64, 96, 3)), jnp.zeros((1, 64, 96), bool))
    assert sources[0].shape[1:3] == (4, 6)


def test_dropout_is_active_only_in_training():
    model = DeformableDETR(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    images, mask = jnp.ones((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool)
    run = nnx.jit(lambda m, x, k, d: m(x, k, deterministic=d)["pred_logits"], static_argnums=3)
    a = run(model, images, mask, True)
    b = run(model, images, mask, True)
    c = run(model, images, mask, False)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_hashed_dropout_masks_are_fair_independent_and_reproducible():
    """keep_mask is what threefry's bernoulli would be: P(keep) = 0.9, no relation
    between neighbouring elements or between two keys; one key, one mask."""
    shape = (4, 500, 512)  # 1,024,000 elements: the standard error of a rate is 3e-4
    a = np.asarray(keep_mask(jax.random.key(0), shape, 0.1))
    b = np.asarray(keep_mask(jax.random.key(1), shape, 0.1))
    np.testing.assert_array_equal(a, keep_mask(jax.random.key(0), shape, 0.1))
    assert abs(a.mean() - 0.9) < 2e-3
    assert abs((a & b).mean() - 0.81) < 2e-3  # two keys: independent masks
    flat = a.reshape(-1)
    assert abs((flat[1:] & flat[:-1]).mean() - 0.81) < 2e-3  # neighbours independent
    assert abs((a[:, 1:] & a[:, :-1]).mean() - 0.81) < 2e-3  # rows apart too
    assert abs(np.asarray(keep_mask(jax.random.key(2), shape, 0.5)).mean() - 0.5) < 2e-3
    x = jnp.ones(shape)
    dropped = Dropout(0.1, rngs=nnx.Rngs(dropout=0))(x, deterministic=False)
    assert abs(float(dropped.mean()) - 1.0) < 3e-3  # rescaled by 1 / 0.9
    assert set(np.unique(np.asarray(dropped))) == {0.0, np.float32(1 / 0.9)}


@pytest.mark.parametrize("kernel, stride, pad", [(1, 1, 0), (1, 2, 0), (3, 2, 1), (1, 1, 1)])
def test_pointwise_convolutions_as_dots_equal_the_convolution(kernel, stride, pad):
    """Output and both gradients of conv_or_matmul are lax.conv's (the 1x1 ones
    computed as dots, the others by lax.conv itself), odd sizes included."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 11, 16))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, 16, 8))
    padding = ((pad, pad), (pad, pad))
    numbers = ("NHWC", "HWIO", "NHWC")

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, (stride, stride), padding, None, None,
                                                 numbers)))

    ours = jax.value_and_grad(loss(conv_or_matmul), (0, 1))(x, w)
    reference = jax.value_and_grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    if kernel == 1 and pad == 0:
        text = jax.jit(jax.grad(loss(conv_or_matmul), 1)).lower(x, w).as_text()
        assert "convolution" not in text


@pytest.mark.parametrize("height, width", [(9, 11), (8, 12), (1, 2)])
def test_stem_max_pool_and_its_gradient_are_pytorchs(height, width):
    """Output and input gradient of MaxPool2d(3, 2, 1), ties included (ReLU
    outputs on a coarse grid: many windows hold their maximum twice), where
    the gradient goes to each window's first maximum; no select-and-scatter
    in the gradient's program."""
    import torch
    x = jnp.round(jax.nn.relu(jax.random.normal(jax.random.key(0), (2, height, width, 3))) * 2) / 2
    out, vjp = jax.vjp(_max_pool_3x3_s2, x)
    grad_out = jax.random.normal(jax.random.key(1), out.shape)
    x_torch = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).requires_grad_()
    out_torch = torch.nn.functional.max_pool2d(x_torch, 3, 2, 1)
    out_torch.backward(torch.tensor(np.asarray(grad_out)).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(out, out_torch.detach().permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(vjp(grad_out)[0], x_torch.grad.permute(0, 2, 3, 1).numpy(),
                               rtol=1e-6, atol=1e-6)
    text = jax.jit(jax.grad(lambda x: jnp.vdot(_max_pool_3x3_s2(x), grad_out))).lower(x).as_text()
    assert "select_and_scatter" not in text and "reduce_window" not in text


def test_published_initialisation():
    model = DeformableDETR(ModelConfig(**TINY, with_box_refine=True), rngs=nnx.Rngs(0))
    bias = np.asarray(model.bbox_embed.layers[2].bias[...])  # (dec_layers, 4): stacked heads
    np.testing.assert_array_equal(bias[0], [0, 0, -2, -2])
    np.testing.assert_array_equal(bias[1], 0)
    np.testing.assert_allclose(model.class_embed.bias[...][0], -np.log(99), rtol=1e-6)
    kernel = model.class_embed.kernel[...]
    np.testing.assert_array_equal(kernel[0], kernel[1])
    attn = model.encoder.layer(0).self_attn
    assert not np.any(attn.sampling_offsets.kernel[...])
    grid = sampling_offset_bias(8, 4, 4).reshape(8, 4, 4, 2)
    np.testing.assert_allclose(grid[0, 0, :, 0], [1, 2, 3, 4])  # heading 0: along +x
    np.testing.assert_allclose(grid[2, 1, 1], [0, 2], atol=1e-6)  # heading pi/2: along +y


def test_nearest_indices_follow_pytorch():
    import torch
    for n_in, n_out in [(13, 5), (100, 13), (7, 7), (5, 10), (96, 12), (33, 17)]:
        src = torch.arange(n_in, dtype=torch.float32)[None, None, :, None]
        expected = torch.nn.functional.interpolate(src, size=(n_out, 1))[0, 0, :, 0].long()
        np.testing.assert_array_equal(nearest_indices(n_in, n_out), expected.numpy())


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="two_stage=True needs with_box_refine"):
        abstract(two_stage=True)
    with pytest.raises(ValueError, match="num_feature_levels"):
        abstract(num_feature_levels=2)
    with pytest.raises(ValueError, match="depth"):
        abstract(backbone_depth=42)


def test_stem_and_layer1_get_no_gradient_and_layer2_does():
    model = DeformableDETR(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    images, mask = jnp.ones((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool)

    def loss(p):
        return nnx.merge(graphdef, p, rest)(images, mask)["pred_logits"].sum()

    grads = jax.jit(jax.grad(loss))(params)
    backbone = grads["backbone"]
    assert not np.any(backbone["stem"]["conv"]["kernel"][...])
    assert not np.any(backbone["layers"][0][0]["conv1"]["conv"]["kernel"][...])
    assert np.any(backbone["layers"][1][0]["conv1"]["conv"]["kernel"][...])


def test_encoder_sampling_at_initialisation_matches_the_numpy_oracle():
    """At init, sampling locations are pixel centres plus integer offsets, i.e. exact
    integers in pixel coordinates. Inside one jitted graph XLA once computed them
    with and without FMA contraction in different fusions, flooring differently
    for rows and weights (wrong pixels, errors ~0.2). Checked at batch 1, where
    it showed."""
    from ddetr_jax.models.transformer import encoder_reference_points, valid_ratios
    from tests.numpy_reference import ms_deform_attn_numpy

    model = DeformableDETR(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(1, 64, 64, 3)), jnp.float32)
    pad_mask = jnp.zeros((1, 64, 64), bool).at[:, 48:].set(True)

    @nnx.jit
    def sample(model, images, pad_mask):
        sources, masks, positions = model.features(images, pad_mask)
        shapes = tuple((s.shape[1], s.shape[2]) for s in sources)
        src = jnp.concatenate([s.reshape(1, -1, 64) for s in sources], 1)
        pos = jnp.concatenate([p.reshape(1, -1, 64) for p in positions], 1)
        mask = jnp.concatenate([m.reshape(1, -1) for m in masks], 1)
        ref = encoder_reference_points(shapes, valid_ratios(masks))
        attn = model.encoder.layer(0).self_attn
        out, locations, weights = attn.sample(src + pos, ref, src, shapes, mask)
        value = jnp.where(mask[..., None], 0, attn.value_proj(src)).reshape(1, -1, 4, 16)
        return attn.output_proj.kernel[...], out - attn.output_proj.bias[...], value, \
            locations, weights, shapes

    kernel, projected, value, locations, weights, shapes = sample(model, images, pad_mask)
    shapes = tuple(tuple(int(v) for v in s) for s in np.asarray(shapes))
    expected = ms_deform_attn_numpy(value, shapes, locations, weights,
                                    np.zeros((1, locations.shape[1], 64)))[0] @ np.asarray(kernel)
    np.testing.assert_allclose(projected, expected, atol=1e-4)
