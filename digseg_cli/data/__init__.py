"""Data: user training folders, their check, synthetic scenes, and the public benchmarks (`benchmarks/`)."""
