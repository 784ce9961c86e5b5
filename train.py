"""Trains Deformable DETR: python train.py --config configs/X.py --workdir DIR [--config.a.b=v].

Rerunning the same command on the same workdir resumes from its latest
checkpoint (a damaged one is set aside). One run per workdir: a second is
refused. --config_help lists the --config.* fields; --verbose shows the
libraries' logs. Multi-host: run the same command on every host with
--coordinator_address HOST:PORT --num_processes N --process_id I (see README).
"""

import sys

from absl import flags
from ml_collections import config_flags

from ddetr_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file in configs/",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and config go")
_OVERRIDE = flags.DEFINE_bool("override_config", False,
                              "resume a workdir whose saved config differs from --config")
flags.adopt_module_key_flags(cli)  # --verbose, --config_help, the multi-host flags


def main(argv):
    del argv
    cli.start()
    from ddetr_jax.checkpoints.store import SaveFailed
    from ddetr_jax.train.loop import NonFiniteError, TrainingStopped, train
    from ddetr_jax.train.workdir_lock import WorkdirBusy
    try:
        train(_CONFIG.value, _WORKDIR.value, override_config=_OVERRIDE.value)
    except TrainingStopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(128 + int(stopped.signum))
    except (NonFiniteError, SaveFailed, WorkdirBusy, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main, required=("config", "workdir"))
