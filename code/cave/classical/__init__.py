"""Part 2, classical: convolutional and recurrent networks."""
