"""train.py on 2 processes (jax.distributed on 127.0.0.1, 1 CPU device each) ends like
1 process with 2 devices: same parameters, same evaluation."""

import json
import os
import subprocess
import sys

import numpy as np

from tests.test_multihost import free_port
from tests.test_train_resume import ROOT, _params, setup  # noqa: F401  (fixture)


def _run(config, workdir, env, num_processes):
    port = free_port()
    args = [sys.executable, str(ROOT / "train.py"), f"--config={config}", f"--workdir={workdir}",
            "--config.total_steps=2", "--config.eval_every_steps=0"]
    if num_processes > 1:
        args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}"]
    procs = [subprocess.Popen(args + ([f"--process_id={i}"] if num_processes > 1 else []),
                              env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def _last_eval(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "eval/AP" in r][-1]


def test_two_processes_train_like_one(setup):  # noqa: F811
    base, config, env = setup
    single = dict(env, JAX_NUM_CPU_DEVICES="2")
    _run(config, base / "one_process", single, 1)
    multi = {k: v for k, v in env.items() if k != "JAX_NUM_CPU_DEVICES"}
    multi.update(JAX_NUM_CPU_DEVICES="1", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    outs = _run(config, base / "two_processes", multi, 2)
    assert "evaluation at step 2" in outs[0] and "evaluation at step 2" not in outs[1]
    step_a, params_a = _params(base / "one_process")
    step_b, params_b = _params(base / "two_processes")
    assert step_a == step_b == 2
    for (path, a), (_, b) in zip(params_a, params_b):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                                   err_msg=str(path))
    eval_a, eval_b = _last_eval(base / "one_process"), _last_eval(base / "two_processes")
    assert eval_a.keys() == eval_b.keys()
    for key in eval_a:
        assert abs(eval_a[key] - eval_b[key]) < 1e-6, key
    assert not os.path.exists(base / "two_processes" / "metrics.jsonl.replaced-0")
