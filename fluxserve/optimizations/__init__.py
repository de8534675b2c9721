"""GPU optimizations, one module per optimization, and `apply`, the one place that applies a stack's choices
to a pipeline."""
