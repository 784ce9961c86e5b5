"""The data-parallel train step: every variant trains; 8 devices == 1 device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddetr_jax.losses import LossConfig
from ddetr_jax.optimizer import OptimizerConfig, make_optimizer, param_group
from ddetr_jax.sharding import data_mesh, shard_batch, split_model
from ddetr_jax.train.step import HostMatchedStep, init_state, make_train_step
from tests.train_fixtures import random_batch, tiny_model

OPT = OptimizerConfig(lr_drop_step=100)


pytestmark = pytest.mark.usefixtures("fast_compile")


def setup(devices, model=None, **step_kwargs):
    graphdef, params, rest = split_model(model if model is not None else tiny_model())
    tx, lr = make_optimizer(params, OPT)
    mesh = data_mesh(devices)
    step = make_train_step(graphdef, rest, tx, lr, mesh, **step_kwargs)
    return step, init_state(jax.tree.map(jnp.copy, params), tx, mesh), mesh


def test_param_groups():
    assert param_group(("backbone", "stem", "conv", "kernel")) == "frozen"
    assert param_group(("backbone", "layers", 0, 1, "conv1", "conv", "kernel")) == "frozen"
    assert param_group(("backbone", "layers", 1, 0, "conv1", "conv", "kernel")) == "backbone"
    assert param_group(("encoder", "layers", 0, "self_attn", "sampling_offsets", "bias")) \
        == "linear_proj"
    assert param_group(("reference_points", "kernel")) == "linear_proj"
    assert param_group(("decoder", "layers", 1, "cross_attn", "value_proj", "kernel")) \
        == "default"
    assert param_group(("class_embed", 0, "bias")) == "default"


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("variant", [
    dict(num_feature_levels=1), dict(num_feature_levels=1, dilation=True), dict(),
    dict(with_box_refine=True), dict(with_box_refine=True, two_stage=True)])
def test_every_variant_trains_one_step(variant, devices):
    model = tiny_model(**variant, dropout=0.1)
    step, state, mesh = setup(jax.devices()[:devices], model)
    before = jax.tree.map(np.asarray, state.params)
    batch = random_batch(batch=devices if devices > 1 else 2)
    state, metrics = step(state, shard_batch(batch, mesh), jax.random.key(0))
    assert int(metrics["nonfinite"]) == 0 and int(state.step) == 1
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert int(metrics["num_matched"]) == batch["target_valid"].sum()
    assert ("loss_ce_enc" in metrics) == variant.get("two_stage", False)
    after = jax.tree.map(np.asarray, state.params)
    np.testing.assert_array_equal(after["backbone"]["stem"]["conv"]["kernel"],
                                  before["backbone"]["stem"]["conv"]["kernel"])
    assert not np.array_equal(after["backbone"]["layers"][1][0]["conv1"]["conv"]["kernel"],
                              before["backbone"]["layers"][1][0]["conv1"]["conv"]["kernel"])
    ffn = lambda p: p["decoder"]["layers"]["ffn"]["linear1"]["kernel"]  # noqa: E731
    assert not np.array_equal(ffn(after), ffn(before))


def test_eight_devices_equal_one_device():
    """Uneven target counts, one image without targets. A 96-pixel image and
    4 channels per GroupNorm group keep the extra 2x2 level well conditioned
    (at 64 pixels its GroupNorm sees 2 numbers per group, and float rounding
    alone moves the gradients by 3e-4)."""
    batch = random_batch(size=96)
    results = []
    for devices in (jax.devices()[:8], jax.devices()[:1]):
        assert len(devices) in (1, 8)
        step, state, mesh = setup(devices, tiny_model(with_box_refine=True, dim=128))
        state, metrics = step(state, shard_batch(batch, mesh), jax.random.key(0))
        results.append((jax.tree.map(np.asarray, state.params), jax.device_get(metrics)))
    (p8, m8), (p1, m1) = results
    for key in ("loss", "loss_ce", "loss_bbox_0", "loss_giou", "grad_norm", "num_matched"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, err_msg=key)
    assert m8["num_boxes"] == 19 / 8 and m1["num_boxes"] == 19
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nonfinite_step_is_skipped():
    step, state, mesh = setup(jax.devices()[:2])
    before = jax.tree.map(np.asarray, state.params)
    batch = random_batch(batch=2)
    batch["images"][0, 0, 0, 0] = np.nan
    state, metrics = step(state, shard_batch(batch, mesh), jax.random.key(0))
    assert int(metrics["nonfinite"]) == 1 and int(state.step) == 0
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, state.params)),
                    jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("variant", [{}, {"with_box_refine": True, "two_stage": True}],
                         ids=["multi_scale", "two_stage"])
@pytest.mark.filterwarnings("error:scatter inputs have incompatible types:FutureWarning")
def test_bfloat16_compute_keeps_float32_params_and_close_loss(variant):
    """The float32 step is test_every_variant_trains_one_step's on one device (same
    model, batch and key), so the run's compilation cache holds it already."""
    batch = random_batch(batch=2)
    losses = []
    for dtype in (None, jnp.bfloat16):
        step, state, mesh = setup(jax.devices()[:1], tiny_model(**variant, dropout=0.1),
                                  compute_dtype=dtype)
        state, metrics = step(state, shard_batch(batch, mesh), jax.random.key(0))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[1], losses[0], rtol=5e-2)


def test_host_matching_equals_matching_inside_the_step():
    """scipy between the two programs (the default) == optax inside one program:
    same matching, losses and gradients, on 2 devices (no host callback to
    deadlock them), two steps with dropout (the residuals carry its masks).
    Plain SGD, so that parameters compare gradients: AdamW would scale a
    gradient that is float noise up to a whole step."""
    batch = random_batch(batch=4, size=96)
    results = []
    for solver in ("scipy", "optax"):
        model = tiny_model(with_box_refine=True, two_stage=True, dim=128, dropout=0.1)
        graphdef, params, rest = split_model(model)
        tx = optax.sgd(1e-2)
        mesh = data_mesh(jax.devices()[:2])
        step = make_train_step(graphdef, rest, tx, lambda _: 1e-2, mesh,
                               LossConfig(solver=solver))
        assert isinstance(step, HostMatchedStep) == (solver == "scipy")
        state = init_state(params, tx, mesh)
        params_per_step, metrics_per_step = [], []
        for i in range(2):
            state, metrics = step(state, shard_batch(batch, mesh), jax.random.key(i))
            params_per_step.append(jax.tree.map(np.asarray, state.params))
            metrics_per_step.append(jax.device_get(metrics))
        results.append((params_per_step, metrics_per_step))
        if solver == "scipy":  # a label the model cannot predict is never silently unmatched
            bad = dict(batch, labels=np.where(batch["target_valid"], 91, batch["labels"]))
            with pytest.raises(ValueError, match=r"label 91 .* outside \[0, model.num_classes"):
                step(state, shard_batch(bad, mesh), jax.random.key(2))
    (p_host, m_host), (p_device, m_device) = results
    # The second step starts from parameters that differ by float rounding (the two
    # programs fuse differently), and the sampling op's gradient with respect to a
    # location steps where the location crosses a pixel: on some CPUs its gradients
    # then differ by ~1e-4 (gradient norm 2.3e-5 relative, parameters 9e-7 after the
    # SGD step). Other dropout masks in the second step move a parameter by 2e-3
    # and the gradient norm by 4%.
    for i, tolerance in enumerate(({}, {"grad_norm": 1e-4})):
        assert set(m_host[i]) == set(m_device[i])
        for key in m_host[i]:
            np.testing.assert_allclose(m_host[i][key], m_device[i][key],
                                       rtol=tolerance.get(key, 2e-5), atol=1e-7,
                                       err_msg=f"step {i}: {key}")
    for i, atol in enumerate((1e-7, 1e-5)):
        for a, b in zip(jax.tree.leaves(p_host[i]), jax.tree.leaves(p_device[i])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol, err_msg=f"step {i}")
