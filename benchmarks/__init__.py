"""Speed and memory measurements of the drifting loss (DESIGN §5-§6): ``python -m benchmarks.run``."""
