"""GPU benchmarks (functions returning rows of measurements; not tests)."""
