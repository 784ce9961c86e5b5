"""Test set-up: 8 simulated CPU devices for the multi-device tests.

Must run before JAX initialises its backends, hence the environment variable.
"""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
