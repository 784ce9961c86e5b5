"""Datasets and the input pipeline: COCO-format folders, TFDS and synthetic data."""
