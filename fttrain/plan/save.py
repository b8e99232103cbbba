"""The final weights under each plan: gathered whole on rank 0, or written as
shards by every rank (full weights under ZeRO-3 / FSDP with
dist.save_format=sharded), or by a method that writes its own folder."""

from __future__ import annotations

from fttrain.env import is_main_process
from fttrain.methods import method_of
from fttrain.plan import plan_of
from fttrain.plan.translate import sharded_save


def full_trainable_weights(trainer):
    """(name, whole tensor) for every trainable parameter, gathered from the
    shards under FSDP and ZeRO-3. A collective there: every rank must call it."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    named = [(n, p) for n, p in sorted(model.named_parameters()) if p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in named):  # ZeRO-3 partitions
        import deepspeed

        # The last eval / generation pass may have left prefetched parameters
        # in flight; release them before gathering.
        trainer.model_wrapped.empty_partition_cache()
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            gathered = [(n, p.detach().clone()) for n, p in named]
        yield from gathered
        return
    for name, p in named:
        if hasattr(p, "full_tensor"):  # FSDP2 DTensor
            # A copy: the gathered tensor can share storage that FSDP later frees.
            yield name, p.full_tensor().detach().clone()
        else:
            yield name, p.detach().clone()


SHARDED_NOTE = """These weights are sharded: each rank wrote its own part ({kind}).
Merge them into one standard Hugging Face folder (on one machine, CPU only):

    python -m fttrain.consolidate {folder}

"""


def save_model(trainer, out_dir, dist_cfg, peft_method: str, final_dir=None) -> str:
    """Write the final weights; every rank calls this. Returns the format:
    "hf" (a standard folder, loadable without fttrain), "zero_sharded" or
    "fsdp_sharded". (The Trainer's save_model writes nothing at all for FSDP's
    sharded state dict, so fttrain saves that case itself.)"""
    out_dir = str(out_dir)
    method = method_of(peft_method)
    if method.save is not None:  # a method that writes its own folder (fttrain's bottleneck adapters)
        method.save(trainer, out_dir, full_trainable_weights(trainer))  # gathering the weights is collective
        return method.saves
    if not sharded_save(dist_cfg, peft_method):
        trainer.save_model(out_dir)  # gathers to rank 0 under ZeRO-3 / FSDP
        return "hf"
    acc = trainer.accelerator
    if plan_of(dist_cfg) == "fsdp":
        from accelerate.utils import save_fsdp_model

        save_fsdp_model(acc.state.fsdp_plugin, acc, trainer.model, out_dir)
        kind = "fsdp_sharded"
    else:
        trainer.save_model(out_dir)  # the ZeRO-3 checkpoint, one file per rank
        kind = "zero_sharded"
    acc.wait_for_everyone()
    if is_main_process():
        model = acc.unwrap_model(trainer.model)
        model.config.save_pretrained(out_dir)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out_dir)
        from pathlib import Path

        (Path(out_dir) / "SHARDED.md").write_text(SHARDED_NOTE.format(kind=kind, folder=final_dir or out_dir))
    return kind
