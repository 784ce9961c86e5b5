"""Training (train.py): loop.train(config, workdir) runs it.

loop          the run: data, model, step, evaluation, checkpoints, resume
step          the data-parallel train step (scipy matching between two programs)
optimizer     AdamW with the published parameter groups, clipping and schedule
defaults      the published recipe, the base of configs/*.py
settings      a config -> typed settings, checked at start-up
run_config    WORKDIR/config.json, checked on every resume
checkpoint    orbax checkpoints: the latest k plus the best by AP
workdir       a model from a training workdir
workdir_lock  one run per workdir
metrics       interval means, metrics.jsonl, TensorBoard, stdout
progress      the progress bar
"""
