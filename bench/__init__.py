"""ckreg benchmarks and the merge-quality model zoo."""
