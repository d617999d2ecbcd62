"""Part 3, transformers: the 2017 Transformer, LLaMA and its training, vision transformers."""
