"""Runtime: communication, micro-batching, split backward, executor."""
