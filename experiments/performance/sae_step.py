"""One stacked SAE step of the analysis engine against the bare encode, in one process, interleaved.

The step is what `engine._run_batch` does per layer group on the CPU after the forward: `StackedSAEs.encode` (sparse
code, reused work buffer), the decode from active features, `LayerStats.update` and `FeatureStats.update`. The bare
encode is the benchmark floor's share of it (`bench.contenders.run_floor`): one batched matmul and the threshold mask.
Shape: one group of the CPU benchmark (13 layers, ~800 analysed tokens of a 16-sentence batch, hidden 256, 2048-wide
JumpReLU SAEs firing on ~3% of features). Prints the medians of 15 interleaved repeats and the step's cost above the
encode. Run: `python experiments/performance/sae_step.py` (one thread, ~1 minute); to compare two commits, run it in
each checkout (`PYTHONPATH=<checkout>`).
"""

import statistics
import time

import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

import mlalign
from mlalign.analysis.features import FeatureStats
from mlalign.saes.encode import StackedSAEs
from mlalign.analysis.stats import LayerStats

LAYERS, TOKENS, D_MODEL, D_SAE, SENTENCES = 13, 800, 256, 2048, 16


def build() -> StackedSAEs:
    saes = []
    for _ in range(LAYERS):
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_MODEL, d_sae=D_SAE, dtype="float32", device="cpu"))
        with torch.no_grad():
            sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(D_SAE, D_MODEL), dim=1))
            sae.W_enc.copy_(sae.W_dec.T)
            sae.threshold.fill_(1.9)  # ~3% of features fire on a unit-variance residual
        saes.append(sae)
    return StackedSAEs(saes)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    stack = build()
    x = torch.randn(LAYERS * TOKENS, D_MODEL)
    sentence = torch.arange(SENTENCES).repeat_interleave(TOKENS // SENTENCES)
    work = torch.empty(LAYERS * TOKENS * D_SAE)
    mask = torch.empty(LAYERS * TOKENS * D_SAE, dtype=torch.bool)

    def step():
        acts, code = stack.encode(x, with_code=True, out=work, dense=False)
        x_hat = stack.decode(acts, code)
        LayerStats(SENTENCES, D_MODEL, D_SAE, n_layers=LAYERS).update(x, acts, x_hat, sentence, torch.arange(TOKENS),
                                                                      code=code)
        FeatureStats(SENTENCES, D_SAE, n_layers=LAYERS).update(acts, sentence, SENTENCES, sentence, code=code)
        return code.values.numel()

    def bare_encode():
        pre = torch.baddbmm(stack.b_enc, x.view(LAYERS, TOKENS, D_MODEL), stack.W_enc,
                            out=work.view(LAYERS, TOKENS, D_SAE))
        pre.masked_fill_(torch.le(pre, stack.threshold, out=mask.view(LAYERS, TOKENS, D_SAE)), 0)

    active = step()
    times = {"step": [], "bare_encode": []}
    for _ in range(3):
        step(), bare_encode()
    for _ in range(15):
        for name, fn in (("step", step), ("bare_encode", bare_encode)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    print(f"mlalign from {mlalign.__file__}; {active / (LAYERS * TOKENS):.1f} active features per token")
    print(f"step {ms['step']:.1f} ms, bare encode {ms['bare_encode']:.1f} ms: step / encode "
          f"{ms['step'] / ms['bare_encode']:.3f}, {ms['step'] - ms['bare_encode']:.1f} ms above it")


if __name__ == "__main__":
    main()
