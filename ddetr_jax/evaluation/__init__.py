"""Detection evaluation."""
