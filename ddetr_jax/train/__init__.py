"""Training: optimizer (optax), the data-parallel train step."""
