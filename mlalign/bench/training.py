"""Training-step contenders: mlalign's real objective (ObjectiveFn) on a peft LoRA model, plain vs activation-aware."""

from __future__ import annotations

import torch

from mlalign.bench.workload import CONF_DIR, Bench

def _project_cfg(overrides: list[str] | None = None):
    """The project's composed config (the same loss and LoRA settings a `task=train` run gets)."""
    from hydra import compose, initialize_config_dir

    import mlalign.config  # noqa: F401  (registers the typed config schemas)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def _loss_cfg(**overrides):
    return _project_cfg([f"loss.{key}={value}" for key, value in overrides.items()]).loss


def build_training(bench: Bench):
    import copy

    from accelerate import Accelerator
    from hydra.utils import instantiate
    from peft import get_peft_model

    from mlalign.training.data import ParallelStream, tokenize
    from mlalign.training.loop import ObjectiveFn

    s = bench.settings
    accelerator = Accelerator(cpu=s.device == "cpu", mixed_precision="bf16" if s.shape.dtype == "bfloat16" else "no")
    base = copy.deepcopy(bench.model).float() if s.device == "cpu" else copy.deepcopy(bench.model)
    model = get_peft_model(base, instantiate(_project_cfg().lora, _convert_="all"))
    saes = {layer: sae.float() if s.device == "cpu" else sae for layer, sae in bench.saes.items()}
    targets = [lang for lang in bench.texts if lang != "en"]
    target_ids = {lang: tokenize(bench.tokenizer, bench.texts[lang], s.max_length) for lang in targets}
    reference_ids = {lang: tokenize(bench.tokenizer, bench.texts["en"], s.max_length) for lang in targets}
    stream = ParallelStream(targets, target_ids, reference_ids, int(bench.tokenizer.pad_token_id), s.seed)
    layers = sorted(saes)
    objectives = {
        "plain": ObjectiveFn(_loss_cfg(act_align=0.0, sae_fidelity=0.0, en_retain=0.0), saes, layers,
                             bench.tokenizer.bos_token_id, accelerator),
        # The activation term's own cost (issue: "step-time cost of the activation term against plain LoRA") ...
        "act": ObjectiveFn(_loss_cfg(sae_fidelity=0.0, en_retain=0.0), saes, layers, bench.tokenizer.bos_token_id,
                           accelerator),
        # ... and the full default objective: the SAE-fidelity term adds a frozen forward on the target batch and an
        # adapted English forward, KL retention a graph-keeping English forward + backward.
        "full": ObjectiveFn(_loss_cfg(), saes, layers, bench.tokenizer.bos_token_id, accelerator),
    }
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    return accelerator, model, optimizer, params, stream, objectives, s.train_batch_size


def train_step(training, name: str, index: int) -> None:
    """One optimizer step as `train_loop` takes it: objective, backward, clip, step, zero_grad."""
    accelerator, model, optimizer, params, stream, objectives, batch_size = training
    batch = stream.batch(index, batch_size, accelerator.device)
    objective = objectives[name]
    total = objective(model, batch).total if not callable(getattr(objective, "bare", None)) else objective.bare(model, batch)
    accelerator.backward(total)
    accelerator.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class BarePlainObjective:
    """Plain LoRA's objective built from mlalign's loss function alone (target-language cross-entropy): the fallback
    when `ObjectiveFn(loss=plain)` cannot run."""

    def bare(self, model, batch):
        from mlalign.training.losses import lm_cross_entropy

        logits = model(**batch.target, use_cache=False).logits
        return lm_cross_entropy(logits, batch.target["input_ids"], batch.target["attention_mask"])


def usable_objectives(training) -> dict[str, str]:
    """Try one step of each objective; replace one that fails by the bare plain step (plain) or drop it, and say why."""
    notes = {}
    objectives = training[5]
    embed = training[1].get_input_embeddings()
    for name in list(objectives):
        try:
            passes = []
            handle = embed.register_forward_hook(lambda *_: passes.append(1))
            try:
                train_step(training, name, 0)
            finally:
                handle.remove()
            notes[name] = (f"mlalign.training.loop.ObjectiveFn({_OBJECTIVE_LOSS[name]}): "
                           f"{len(passes)} model forward passes per micro-batch")
        except Exception as err:  # noqa: BLE001 - the training code is young; the benchmark reports, not crashes
            why = f"ObjectiveFn({_OBJECTIVE_LOSS[name]}) failed: {type(err).__name__} {err}".strip()
            print(why, flush=True)
            training[2].zero_grad(set_to_none=True)
            if name == "plain":
                objectives[name] = BarePlainObjective()
                train_step(training, name, 0)
                notes[name] = f"fallback: forward + mlalign.training.losses.lm_cross_entropy ({why})"
            else:
                del objectives[name]
                notes[name] = f"not measured ({why})"
    return notes


_OBJECTIVE_LOSS = {"plain": "loss=plain", "act": "loss=act_align loss.sae_fidelity=0 loss.en_retain=0",
                   "full": "loss=act_align"}
