"""The training step reads nothing back from the device it does not need.

On a GPU every host read of a device tensor (``.item()``, ``int(t)``,
``bool(t)``, ``.tolist()``) waits for the queue to drain. On CPU there is no
queue, so the test counts the reads themselves: inside ``trainer.train()``,
outside batch collation (the collator works on host tensors before the batch
moves) and outside the model's forward and torch's optimizer (see
MODEL_AND_OPTIMIZER), with the default logging interval.
"""

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from conftest import compose

READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__")
# Reads that are not the training loop's: the model's own forward (transformers
# finds packed rows from position_ids with one data-dependent test per forward
# under sdpa/eager; a raw loop on the same batch pays it too), and torch's Adam,
# whose step counters live on the host unless the optimizer is capturable.
MODEL_AND_OPTIMIZER = ("transformers/masking_utils.py", "optim/adam.py", "optim/adamw.py", "optim/optimizer.py")


class HostReads:
    """Counts host reads of tensors while ``active``."""

    def __init__(self):
        self.active = False
        self.count = 0
        self.where = []

    @contextlib.contextmanager
    def patched(self):
        originals = {name: getattr(torch.Tensor, name) for name in READS}

        def counting(name, original):
            def read(t, *args, **kwargs):
                if self.active:
                    caller = sys._getframe(1)
                    place = f"{name} {'/'.join(Path(caller.f_code.co_filename).parts[-2:])}:{caller.f_lineno}"
                    if not place.split()[1].startswith(MODEL_AND_OPTIMIZER):
                        self.count += 1
                        self.where.append(place)
                return original(t, *args, **kwargs)
            return read

        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(name, original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)


class CountDuringTraining(TrainerCallback):
    def __init__(self, reads: HostReads):
        self.reads = reads

    def on_train_begin(self, args, state, control, **kwargs):
        self.reads.active = True

    def on_train_end(self, args, state, control, **kwargs):
        self.reads.active = False


def host_reads_per_step(tmp_path, overrides, steps):
    from fttrain.recipes import recipe_class
    from fttrain.run import prepare_run_dir

    cfg = compose(["+exp=tiny_sft", f"output_root={tmp_path}", "name=reads", f"trainer.max_steps={steps}",
                   "data.eval=null", "data.eval_fraction=0", "task.generation_eval.num_samples=0", *overrides])
    prepare_run_dir(cfg, tmp_path / "reads")
    recipe = recipe_class(cfg.task.name)(cfg, tmp_path / "reads")
    reads = HostReads()
    try:
        recipe.setup()
        trainer = recipe.trainer
        trainer.add_callback(CountDuringTraining(reads))
        collate = trainer.get_batch_samples

        def without_collation(*args, **kwargs):  # host work on host tensors
            active, reads.active = reads.active, False
            try:
                return collate(*args, **kwargs)
            finally:
                reads.active = active

        trainer.get_batch_samples = without_collation
        with reads.patched():
            recipe.train()
    finally:
        recipe.stop_on_signal.restore()
    return reads.count / steps, reads.where


@pytest.mark.slow
def test_at_most_one_host_read_per_optimizer_step_at_default_settings(tmp_path):
    from fttrain.config.schema import TrainerConfig

    steps = 20
    per_step, where = host_reads_per_step(
        tmp_path, [f"trainer.logging_steps={TrainerConfig.logging_steps}", "trainer.gradient_accumulation_steps=2"],
        steps)
    assert per_step <= 1.0, where


@pytest.mark.slow
def test_the_counter_sees_the_reads_of_logging_every_step(tmp_path):
    # The count must be able to fail: logging every step reads the loss and
    # the gradient norm back at every step.
    per_step, where = host_reads_per_step(tmp_path, ["trainer.logging_steps=1"], 6)
    assert per_step >= 2, where
