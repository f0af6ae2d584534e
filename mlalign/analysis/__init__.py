"""Activation capture (forward hooks on decoder layers) and the per-language, per-layer SAE statistics."""
