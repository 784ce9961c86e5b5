"""Training (train.py): loop.train(config, workdir) runs it.

loop          the run: data, model, step, evaluation, checkpoints, resume
step          the data-parallel train step (scipy matching between two programs)
workdir_lock  one run per workdir
metrics       interval means, metrics.jsonl, TensorBoard, stdout
progress      the progress bar
"""
