"""SAEs in one package, the only one that reaches into sae-lens: loading, placebo, fast encode, surrogates, training.

`loading` reads each layer's SAE (a sae-lens release or a local folder) and checks that it fits; `placebo` builds
task=compare's placebo SAE; `encode` is the analysis's fused encode and sparse decode; `surrogates` is the loss's
differentiable view of the code (pre-activations, thresholds, JumpReLU and its straight-through estimator); `training`
trains one JumpReLU SAE with sae-lens's SAETrainer. `import mlalign.saes` stays light (no torch at import): it
re-exports loading and the placebo, and the code that needs `encode`, `surrogates` or `training` imports that
submodule."""

from mlalign.saes.loading import (LOCAL_SAE_FIX, NO_SAE_OFFLINE, check_local_sae, check_sae_config, check_sae_seeds,
                                  load_sae, load_saes, local_sae_path, pretrained_release, registry_ids,
                                  resid_post_hook, sae_id_for, seed_folder)
from mlalign.saes.placebo import placebo_sae

__all__ = ["LOCAL_SAE_FIX", "NO_SAE_OFFLINE", "check_local_sae", "check_sae_config", "check_sae_seeds", "load_sae",
           "load_saes", "local_sae_path", "placebo_sae", "pretrained_release", "registry_ids", "resid_post_hook",
           "sae_id_for", "seed_folder"]
