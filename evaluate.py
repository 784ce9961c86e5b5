"""Evaluates a checkpoint with COCO metrics:

    python evaluate.py [--config configs/X.py] --checkpoint PATH --output DIR [--split validation]

PATH: a training workdir (--which latest or best), one of its
checkpoints/STEP folders, a converted checkpoint directory
(python -m ddetr_jax.convert), or an authors' .pth / HuggingFace weights file
or directory (converted on the fly). A training workdir brings its config
(WORKDIR/config.json: the model and the dataset it was trained on); --config
is then optional, and refused if its data section contradicts the run's.
Writes DIR/metrics.json, DIR/results.json
and, with --draw N, N images with their detections in DIR/images/.
"""

import sys

from absl import flags
from ml_collections import config_flags

from ddetr_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "the config the model was trained "
                                          "with (model and dataset); default for a training "
                                          "workdir: its config.json", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "what to evaluate (see above)")
_OUTPUT = flags.DEFINE_string("output", None, "where metrics.json and results.json go")
_SPLIT = flags.DEFINE_string("split", None, "dataset split (default: config.data.eval_split)")
_WHICH = flags.DEFINE_enum("which", "latest", ["latest", "best"],
                           "for a training workdir: its latest or its best checkpoint")
_DRAW = flags.DEFINE_integer("draw", 0, "save this many images with their detections")
_THRESHOLD = flags.DEFINE_float("score_threshold", 0.5, "score threshold of drawn detections")
flags.adopt_module_key_flags(cli)  # --verbose, --config_help, the multi-host flags


def main(argv):
    del argv
    cli.start()
    from ddetr_jax.convert import CheckpointMismatch
    from ddetr_jax.evaluation.run import evaluate_checkpoint
    try:
        evaluate_checkpoint(_CONFIG.value, _CHECKPOINT.value, _OUTPUT.value, split=_SPLIT.value,
                            which=_WHICH.value, num_draw=_DRAW.value,
                            score_threshold=_THRESHOLD.value)
    except (CheckpointMismatch, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main, required=("checkpoint", "output"))
