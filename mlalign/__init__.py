"""mlalign: per-layer SAE activation disparities across languages, and activation-aware LoRA to close them."""

import warnings

# sae-lens 6 imports `transformer_lens.utils`, which TransformerLens 3 deprecates for 4.0 with a DeprecationWarning at
# import. It is sae-lens's import, not ours, and nothing a user can act on; every mlalign module that imports sae_lens
# is under this package, so one filter here, scoped to that message from that module, covers them all (and only it).
warnings.filterwarnings("ignore", message=r"The 'utils' module has been deprecated", category=DeprecationWarning,
                        module=r"sae_lens\.load_model")

__version__ = "0.1.0"
