"""mlalign: per-layer SAE activation disparities across languages, and activation-aware LoRA to close them."""

__version__ = "0.1.0"
