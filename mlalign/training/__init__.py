"""Activation-aware LoRA training: the loss terms, parallel batches, the accelerate loop and its checkpoints."""
