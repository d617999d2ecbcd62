"""Part 4, techniques: optimisation and regularisation."""
