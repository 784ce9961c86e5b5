"""The model's initialisers give jax.nn.initializers' values bit for bit, from one program."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddetr_jax.models import DeformableDETR, ModelConfig, initializers

BOUND = 1 / math.sqrt(256)
PAIRS = {  # ours, the reference
    "conv kernel (variance scaling, fan_out, normal)": (
        initializers.variance_scaling(2.0, "fan_out", "normal"),
        jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")),
    "xavier uniform": (initializers.xavier_uniform(), jax.nn.initializers.xavier_uniform()),
    "variance scaling, fan_in, uniform": (
        initializers.variance_scaling(0.5, "fan_in", "uniform"),
        jax.nn.initializers.variance_scaling(0.5, "fan_in", "uniform")),
    "normal(1)": (initializers.normal(1.0), jax.nn.initializers.normal(1.0)),
    "normal(0.02)": (initializers.normal(0.02), jax.nn.initializers.normal(0.02)),
    "torch linear uniform": (initializers.uniform(-BOUND, BOUND),
                             lambda k, s, d: jax.random.uniform(k, s, d, -BOUND, BOUND)),
    "zeros": (initializers.zeros, jax.nn.initializers.zeros),
    "ones": (initializers.ones, jax.nn.initializers.ones),
    "constant": (initializers.constant(-4.59512), jax.nn.initializers.constant(-4.59512)),
}
# (1, 1, 1024, 2048) is larger than one block (2**21 values).
SHAPES = [(3, 3, 32, 64), (7, 7, 3, 64), (1, 1, 1024, 2048), (300, 256), (256, 91), (5, 3)]


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("partitionable", [True, False])
def test_initializers_equal_jaxs(name, partitionable):
    ours, reference = PAIRS[name]
    with jax.threefry_partitionable(partitionable):
        for i, shape in enumerate(SHAPES):
            key = jax.random.fold_in(jax.random.key(7), i)
            got, want = ours(key, shape, jnp.float32), reference(key, shape, jnp.float32)
            assert isinstance(got, jax.Array) and got.dtype == want.dtype, (shape, got)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(shape))


def test_many_shapes_compile_one_draw(caplog):
    """Eight new shapes, one compiled program for the draws (flax's: one per shape)."""
    init = initializers.variance_scaling(2.0, "fan_out", "normal")
    keys = [jax.random.key(i) for i in range(8)]
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        for i, key in enumerate(keys):
            init(key, (3, 3, 16 + i, 24 + i), jnp.float32)
    compiled = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("Finished XLA compilation")]
    assert len(compiled) <= 1, compiled


def test_a_model_built_abstractly_has_the_shapes_of_a_real_one():
    """Under eval_shape (keys are tracers) the initialisers draw through JAX."""
    config = ModelConfig(dim=32, ffn_dim=64, heads=4, enc_layers=1,
                         dec_layers=1, num_queries=5, backbone_depth=18, backbone_width=8)
    abstract = nnx.state(nnx.eval_shape(lambda: DeformableDETR(config, rngs=nnx.Rngs(0))))
    real = nnx.state(DeformableDETR(config, rngs=nnx.Rngs(0)))
    shapes = lambda state: jax.tree.map(lambda x: (x.shape, x.dtype), state)  # noqa: E731
    assert shapes(abstract) == shapes(real)
