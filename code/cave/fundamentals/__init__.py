"""Part 1, fundamentals: PyTorch essentials, data, and deep networks."""
