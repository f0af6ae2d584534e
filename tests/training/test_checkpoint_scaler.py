"""Checkpoints keep the fp16 GradScaler state (the loss scale it reached), as accelerate's save_state does."""

import torch
from accelerate import Accelerator

from mlalign.training.checkpoint import load_checkpoint, save_checkpoint


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = Accelerator(cpu=True)
    model.save_pretrained = lambda path: None  # a bare Linear has no peft adapter folder to write
    return accelerator, model, optimizer, scheduler


def test_the_loss_scale_survives_a_checkpoint(tmp_path):
    # fp16 training on accelerate needs a GPU; its scaler is a torch GradScaler, here the CPU one with the same state.
    accelerator, model, optimizer, scheduler = _setup()
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=3)
    for _ in range(2):  # two overflows: the scale halves twice, as it does in the first steps of fp16 training
        optimizer.zero_grad()
        accelerator.scaler.scale(model(torch.ones(1, 4)).sum()).backward()
        model.weight.grad[0, 0] = float("inf")
        accelerator.scaler.step(optimizer)
        accelerator.scaler.update()
    assert accelerator.scaler.get_scale() == 2.0 ** 14
    saved = save_checkpoint(accelerator, model, optimizer, scheduler, 2, tmp_path / "checkpoints")

    fresh, model2, optimizer2, scheduler2 = _setup()
    fresh.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=3)
    state = load_checkpoint(fresh, model2, optimizer2, scheduler2, saved)
    assert state["grad_scaler"]["scale"] == 2.0 ** 14
    assert fresh.scaler.get_scale() == 2.0 ** 14  # not back at 2**16
    torch.testing.assert_close(model2.weight, model.weight)


def test_a_checkpoint_without_a_scaler_loads_without_one(tmp_path):
    accelerator, model, optimizer, scheduler = _setup()
    saved = save_checkpoint(accelerator, model, optimizer, scheduler, 1, tmp_path / "checkpoints")
    state = load_checkpoint(accelerator, model, optimizer, scheduler, saved)
    assert "grad_scaler" not in state and state["step"] == 1
