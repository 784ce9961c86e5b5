"""Checkpoints: one home for reading a model from any path, and the training run's store.

loading  a model from a training workdir, a step folder, a converted directory,
         a HuggingFace directory or a PyTorch weights file (load_model)
store    orbax checkpoints of a training run: the latest k plus the best by AP
"""
