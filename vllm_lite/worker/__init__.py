"""The worker: turns a scheduled step into tensors, runs the model, samples (one process per
tensor-parallel rank)."""
