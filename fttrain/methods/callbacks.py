"""Trainer callbacks of the methods that act during training (LISA's layer draws,
AdaLoRA's rank budget). Apart from their declarations, so that reading the
declarations (composing a config) does not import transformers' trainer."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from fttrain.methods.lisa import draw_layers
from fttrain.models.layers import embedding_param_names, head_param_names, layer_param_names

log = logging.getLogger("fttrain")


class LisaCallback(TrainerCallback):
    def __init__(self, model, peft_cfg, seed: int):
        self.k = peft_cfg.active_layers
        self.every = peft_cfg.switch_every
        self.seed = seed
        self.layers = layer_param_names(model)
        self.always = set((embedding_param_names(model) if peft_cfg.train_embeddings else []) + (
            head_param_names(model) if peft_cfg.train_head else []))
        self.params = dict(model.named_parameters())
        self.trainer = None  # set by the recipe: the optimizer whose state is dropped
        self.period = None
        self.history = []  # (step, active layer indices), also logged as lisa_layers

    def _draw(self, period: int):
        """(drawn layer indices, names of every parameter trained in that period)."""
        active = draw_layers(self.seed, period, len(self.layers), self.k)
        return active, self.always | {n for i in active for n in self.layers[i]}

    def active_count(self) -> int:
        """Parameters trainable at a time (the first draw's; layers are alike in size)."""
        return sum(self.params[n].numel() for n in self._draw(0)[1])

    def _apply(self, step: int) -> None:
        period = step // self.every
        if period == self.period:
            return
        active, on = self._draw(period)
        for name, p in self.params.items():
            was = p.requires_grad
            p.requires_grad_(name in on)
            if was and name not in on:
                self._drop_state(p)
        self.period = period
        self.history.append((step, active))
        log.info("LISA step %d: training layers %s", step, active)

    def _drop_state(self, p) -> None:
        opt = getattr(self.trainer, "optimizer", None) if self.trainer is not None else None
        if opt is None:
            return
        inner = getattr(opt, "optimizer", opt)  # accelerate wraps the torch optimizer
        inner.state.pop(p, None)
        p.grad = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._apply(state.global_step)  # global_step > 0 on a resumed run

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.history:
            logs["lisa_layers"] = list(self.history[-1][1])


class AdaLoraBudget(TrainerCallback):
    """AdaLoRA reallocates ranks from gradient-based importance after each
    optimizer step; the Trainer does not call it, so this callback does."""

    def __init__(self, model):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Gradients are still there (zeroed after this event); this is step global_step + 1.
        self.model.base_model.update_and_allocate(state.global_step + 1)
