"""Trains Deformable DETR: python train.py --config configs/X.py --workdir DIR [--config.a.b=v].

Rerunning the same command on the same workdir resumes from its latest
checkpoint. Multi-host: run the same command on every host with
--coordinator_address HOST:PORT --num_processes N --process_id I (see README).
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file in configs/",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and config go")
_OVERRIDE = flags.DEFINE_bool("override_config", False,
                              "resume a workdir whose saved config differs from --config")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "multi-host: HOST:PORT of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import jax
    if _COORDINATOR.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from ddetr_jax.train.loop import NonFiniteError, TrainingStopped, train
    from ddetr_jax.compile_cache import enable_compilation_cache
    enable_compilation_cache()
    logging.getLogger("ddetr_jax").setLevel(logging.INFO)
    try:
        train(_CONFIG.value, _WORKDIR.value, override_config=_OVERRIDE.value)
    except TrainingStopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(128 + int(stopped.signum))
    except (NonFiniteError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
