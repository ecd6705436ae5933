"""Demo helpers: real OpenCLIP training trajectories on CPU for the demo, the tests and the benchmarks."""
