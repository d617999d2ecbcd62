"""Part 5, frontiers: the research that changes how attention is computed and what replaces it."""
