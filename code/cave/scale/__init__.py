"""Part 6, scale: training on many processes and devices with torch.distributed."""
