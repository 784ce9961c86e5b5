"""One process of the multi-host test: 2 CPU devices, jax.distributed on 127.0.0.1.

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
Runs 3 train steps on global batches of 4 (this process loads only its half)
and writes the final parameters.
"""

import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

STEPS, GLOBAL_BATCH = 3, 4


def build(devices):
    """The step, state and mesh of the test model (96-pixel images, dim 128:
    well-conditioned GroupNorm on the extra level, see test_train_step).

    Plain SGD, so that the parameters differ by what the gradients differ by:
    AdamW scales a near-zero gradient to a whole step, so the float noise of
    summing the devices' gradients in another order (one all-reduce over 4
    devices or 2 x 2 across processes) became lr-sized differences on some CPUs.
    """
    import optax

    from ddetr_jax.sharding import data_mesh, split_model
    from ddetr_jax.train.step import init_state, make_train_step
    from tests.train_fixtures import tiny_model

    graphdef, params, rest = split_model(tiny_model(dim=128))
    tx = optax.sgd(1e-2)
    mesh = data_mesh(devices)
    return (make_train_step(graphdef, rest, tx, lambda _: 1e-2, mesh),
            init_state(params, tx, mesh), mesh)


def run_steps(step, state, mesh, process_id: int, num_processes: int):
    from ddetr_jax.sharding import shard_batch
    from tests.train_fixtures import random_batch

    share = GLOBAL_BATCH // num_processes
    for i in range(STEPS):
        batch = random_batch(seed=i, batch=GLOBAL_BATCH, size=96)
        local = {k: v[process_id * share:(process_id + 1) * share] for k, v in batch.items()}
        state, _ = step(state, shard_batch(local, mesh), jax.random.key(42))
    return state


def flat_params(state) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in leaves}


def main():
    process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], \
        sys.argv[4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_disable_most_optimizations", True)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id)
    assert jax.device_count() == 2 * num_processes
    step, state, mesh = build(jax.devices())
    state = run_steps(step, state, mesh, process_id, num_processes)
    np.savez(out, **flat_params(state))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
