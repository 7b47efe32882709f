"""Speed and memory measurements of the drifting loss (docs/design.md §5-§6): ``python -m benchmarks.run``."""
