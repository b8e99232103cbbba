"""Causal-LM fine-tuning recipe (tasks ``sft`` and ``pt``), top to bottom:

    setup      runtime (device, precision, ranks) -> tokenizer -> data -> model + PEFT -> trainer
    train      generations before, train, eval loss, generations after
    save       model/ (atomically), metrics.json, loss curve, samples, COMPLETE

Every rank runs this file; only rank 0 writes shared files.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from fttrain import outputs
from fttrain.config.checks import check_tokenizer_template
from fttrain.config.schema import value_of
from fttrain.data.pipeline import prepare_data_cached
from fttrain.data.packing import PackedCollator, PaddingCollator
from fttrain.data.tokenize import IGNORE
from fttrain.distributed import (
    PlanCheck,
    Topology,
    after_process_group,
    check_plan,
    deepspeed_config_in_use,
    gradient_accumulation,
    plan_label,
    save_model,
    shards_weights,
    single_process_rendezvous,
    trainer_args,
)
from fttrain.env import check_world_size, detect_runtime, peak_memory_bytes
from fttrain.generation_eval import exact_match, generate_answers
from fttrain.models.load import (
    load_model,
    load_tokenizer,
    param_counts,
    resolve_chat_template,
    resolve_model_path,
)
from fttrain.paths import cache_dir
from fttrain.peft_setup import WHOLE_MODEL, apply_peft, optimizer_args, quantization_config, trainer_hooks

log = logging.getLogger("fttrain")


def render_marked_sample(tokenizer, row) -> str:
    """One training row as text, trained tokens in [[...]], for the start-up log."""
    parts, cur, trained = [], [], None
    for tok, lab in zip(row["input_ids"], row["labels"]):
        t = lab != IGNORE
        if trained is not None and t != trained:
            parts.append((trained, cur))
            cur = []
        cur.append(tok)
        trained = t
    parts.append((trained, cur))
    return "".join(
        f"[[{tokenizer.decode(ids)}]]" if t else tokenizer.decode(ids) for t, ids in parts
    )


def _checkpointing_args(on: bool) -> dict:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    # Non-reentrant checkpointing works with frozen inputs (LoRA) without input grads.
    return {f"{prefix}_checkpointing": on, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if on else None}


class SFTRecipe:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.before = self.after = None  # generation results, set during train()

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.runtime = detect_runtime(cfg.precision)
        self.topology = Topology.from_env()
        # Invalid plans and unreachable batch sizes stop here, before any process group starts.
        check_plan(cfg, self.topology, self.runtime.precision, on_gpu=not self.runtime.use_cpu)
        self.accum = gradient_accumulation(cfg.trainer, self.topology.world_size)
        single_process_rendezvous(cfg.dist)
        self.args = self._training_args()  # initialises the process group
        check_world_size(self.args.world_size, self.topology.world_size, cfg.dist)
        after_process_group(cfg.dist, self.runtime.use_cpu)
        self.is_main = self.args.process_index == 0
        self._batch_arithmetic()

        # Local rank 0 builds the tiny model or generated data once; the others wait, then reuse it.
        with self.args.main_process_first(local=True, desc="prepare model files"):
            path = resolve_model_path(cfg.model)
        self.model_path = path
        self.tokenizer, self.pad_strategy = load_tokenizer(cfg.model, path)
        self.chat_template = resolve_chat_template(cfg.data.chat_template, self.tokenizer)
        check_tokenizer_template(cfg, self.chat_template)

        assistant_only = bool(getattr(cfg.task, "assistant_only_loss", False))
        with self.args.main_process_first(local=True, desc="prepare data"):
            self.data = prepare_data_cached(cfg.data, self.tokenizer, self.chat_template, assistant_only, cache_dir())
        if self.is_main:
            log.info("data: %s", self.data.report)
            log.info("sample with trained tokens in [[...]]:\n%s", render_marked_sample(self.tokenizer, self._first_sample()))
            if not cfg.preflight:
                outputs.write_json(self.run_dir / "data_report.json", self.data.report)

        if cfg.preflight:
            return

        # Seed before any weight is created: adapter init (LoRA A) draws from the
        # global RNG, and runs must start from the same weights to be comparable.
        from transformers import set_seed

        set_seed(cfg.trainer.seed)
        quant = quantization_config(cfg.peft, self.runtime.precision)
        # Frozen base weights may live in bf16; trained weights of the model
        # itself (full, freeze, LISA, GaLore) stay fp32 masters under autocast.
        load_precision = "bf16" if self.runtime.precision == "bf16" and cfg.peft.method not in WHOLE_MODEL else "fp32"
        model = load_model(cfg.model, path, load_precision, quantization_config=quant)
        model.config.use_cache = False  # packed batches and checkpointing both need it off
        if cfg.trainer.gradient_checkpointing:
            log.info("gradient checkpointing on: use_cache turned off")
        self.model = apply_peft(model, cfg.peft, cfg.trainer.gradient_checkpointing,
                                max_steps=cfg.trainer.max_steps, base_path=path)
        # Callbacks (LISA's layer draws, AdaLoRA's budget) and LoRA+ parameter groups.
        self.hooks = trainer_hooks(self.model, cfg.peft, cfg.trainer)
        self.trainable, self.total = param_counts(self.model)
        if cfg.peft.method == "lisa":  # every layer is trainable until the first draw
            self.trainable = self.hooks.callbacks[0].active_count()
        if self.is_main:
            log.info(
                "parameters (peft=%s): %d trainable of %d (%.4f%%)",
                cfg.peft.method, self.trainable, self.total, 100 * self.trainable / self.total,
            )
        self.trainer = self._trainer()

    def _first_sample(self):
        row = self.data.train.rows[0]
        if "position_ids" not in row:
            return row
        end = row["position_ids"][1:].index(0) + 1 if 0 in row["position_ids"][1:] else len(row["input_ids"])
        return {"input_ids": row["input_ids"][:end], "labels": row["labels"][:end]}

    def _training_args(self):
        from transformers import TrainingArguments

        cfg, rt, t = self.cfg, self.runtime, self.cfg.trainer
        has_eval = cfg.data.eval is not None or cfg.data.eval_fraction > 0
        report_to = list(cfg.logger.report_to) or "none"
        if cfg.logger.project and "wandb" in (report_to if isinstance(report_to, list) else []):
            os.environ.setdefault("WANDB_PROJECT", cfg.logger.project)
        return TrainingArguments(
            output_dir=str(self.run_dir / "checkpoints"),
            run_name=cfg.name,
            per_device_train_batch_size=t.micro_batch_size,
            per_device_eval_batch_size=t.micro_batch_size,
            gradient_accumulation_steps=self.accum,
            max_steps=t.max_steps,
            num_train_epochs=t.num_epochs,
            learning_rate=t.learning_rate,
            lr_scheduler_type=t.lr_scheduler,
            warmup_steps=t.warmup_ratio,  # < 1: a fraction of the total steps
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            # trainer.optim, or GaLore's optimizer; paged optimizers run unpaged on CPU.
            **optimizer_args(cfg.peft, t.optim, rt.use_cpu),
            logging_steps=t.logging_steps,
            eval_strategy="steps" if (t.eval_steps and has_eval) else "no",
            eval_steps=t.eval_steps,
            save_strategy="steps" if t.save_steps else "no",
            save_steps=t.save_steps or 500,
            save_total_limit=t.save_total_limit,
            bf16=rt.precision == "bf16",
            fp16=rt.precision == "fp16",
            use_cpu=rt.use_cpu,
            # DDP knobs, DeepSpeed JSON or FSDP plan, and where checkpointing happens.
            **trainer_args(cfg, rt.precision, self.topology, self.accum, rt.use_cpu, _checkpointing_args),
            average_tokens_across_devices=True,  # loss / trained tokens of the whole global batch
            seed=t.seed,
            data_seed=t.seed,
            remove_unused_columns=False,
            dataloader_num_workers=t.dataloader_num_workers,
            disable_tqdm=not cfg.logger.progress_bar,
            report_to=report_to,
        )

    def _batch_arithmetic(self) -> None:
        t, world = self.cfg.trainer, self.args.world_size
        accum = self.args.gradient_accumulation_steps
        self.global_batch = t.micro_batch_size * accum * world
        max_len = self.cfg.data.max_length
        unit = "packed rows" if self.cfg.data.packing else "samples"
        self.batch_info = {
            "micro_batch_size": t.micro_batch_size,
            "gradient_accumulation_steps": accum,
            "world_size": world,
            "global_batch_size": self.global_batch,
            "global_batch_unit": unit,
            "max_tokens_per_step": self.global_batch * max_len,
        }
        if self.args.process_index == 0:
            log.info(
                "global batch = %d micro x %d accumulation x %d rank(s) = %d %s per step; <= %d x %d = %d tokens per step",
                t.micro_batch_size, accum, world, self.global_batch, unit, self.global_batch, max_len,
                self.global_batch * max_len,
            )

    def _trainer(self):
        from fttrain.trainer import AtTrainBegin, FTTrainer, JsonlLogCallback, StepTimer

        self.step_timer = StepTimer()
        pad = self.tokenizer.pad_token_id
        if self.cfg.data.packing:
            flatten = value_of(self.cfg.model.attn_implementation) == "flash_attention_2"
            collator = PackedCollator(pad, flatten=flatten)
        else:
            collator = PaddingCollator(pad)
        self.plan_check = PlanCheck(self.cfg.dist, getattr(self.model.config, "num_hidden_layers", None),
                                    self._record_plan, checkpointing=self.cfg.trainer.gradient_checkpointing)
        trainer = FTTrainer(
            model=self.model,
            args=self.args,
            train_dataset=self.data.train.rows,
            eval_dataset=self.data.eval.rows if self.data.eval else None,
            data_collator=collator,
            processing_class=self.tokenizer,
            # Method callbacks first: LISA adds its layer draw to the log line JsonlLogCallback writes.
            callbacks=[*self.hooks.callbacks, JsonlLogCallback(self.run_dir / "train_log.jsonl"), self.step_timer,
                       self.plan_check, AtTrainBegin(self._generations_before)],
            rank_records=self.cfg.trainer.rank_records,
            param_groups=self.hooks.param_groups,
        )
        self.plan_check.trainer = trainer
        for cb in self.hooks.callbacks:
            cb.trainer = trainer
        return trainer

    def _record_plan(self, realised: dict) -> None:
        """The verified plan, with the DeepSpeed JSON as run (auto values filled), in plan.json."""
        if not self.is_main:
            return
        record = {"plan": plan_label(self.cfg.dist), "realised": realised,
                  "deepspeed_config": deepspeed_config_in_use(self.trainer)}
        log.info("plan %s verified: %s", record["plan"], realised)
        outputs.write_json(self.run_dir / "plan.json", record)

    # ------------------------------------------------------------ train
    def _generations_before(self):
        # At train begin (see AtTrainBegin): on a resumed run, the resumed weights.
        self.before = self._generations("before")

    def _generations(self, when: str):
        if shards_weights(self.cfg.dist):
            # Every forward pass gathers weights from all ranks, so all ranks
            # generate the same prompts in step (synced_gpus); rank 0 keeps them.
            result = self._generation_eval(when, synced=True)
            return result if self.is_main else None
        return self._on_main(f"generation {when} training", lambda: self._generation_eval(when))

    def _generation_eval(self, when: str, synced: bool = False):
        gen_cfg = getattr(self.cfg.task, "generation_eval", None)
        if gen_cfg is None or self.data.eval is None:
            return None
        n = max(gen_cfg.num_samples, gen_cfg.exact_match_samples)
        if n <= 0:
            return None
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        results = generate_answers(
            model, self.tokenizer, self.chat_template, self.data.eval.examples, n, gen_cfg.max_new_tokens,
            batch_size=gen_cfg.batch_size, synced_gpus=synced,
        )
        if not results:
            return None
        scored = results[: gen_cfg.exact_match_samples] if gen_cfg.exact_match_samples else []
        em = exact_match(scored) if scored else None
        if em is not None:
            log.info("eval exact match %s training: %.3f on %d held-out rows", when, em, len(scored))
        return {"results": results, "exact_match": em, "n": len(scored)}

    def _on_main(self, what: str, fn):
        """Run fn on rank 0 while the others wait; a failure there stops every
        rank at once instead of leaving them in a barrier until the timeout."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # re-raised below, after telling the other ranks
                error = e
        ok = torch.tensor([0.0 if error else 1.0], device=self.args.device)
        ok = self.trainer.accelerator.reduce(ok, reduction="sum") if self.args.world_size > 1 else ok
        if error is not None:
            raise error
        if float(ok) < self.args.world_size:
            raise RuntimeError(f"rank 0 failed during {what}; see train_rank0.log")
        return result

    def train(self) -> None:
        cfg = self.cfg
        resume = cfg.resume_from
        if resume == "auto":  # guard_run_dir made sure there is one
            resume = str(outputs.latest_checkpoint(self.run_dir))
        if resume is not None:
            from fttrain.trainer import JsonlLogCallback

            step = outputs.checkpoint_step(resume)
            for cb in self.trainer.callback_handler.callbacks:
                if isinstance(cb, JsonlLogCallback):
                    cb.resume_step = step
            log.info("resuming from %s (step %d)", resume, step)
        start = time.time()
        self.trainer.train(resume_from_checkpoint=resume)
        self.train_seconds = time.time() - start
        self.eval_metrics = self.trainer.evaluate() if self.data.eval is not None else {}
        self.after = self._generations("after")

    # ------------------------------------------------------------- save
    def save(self) -> dict:
        from fttrain.trainer import write_rank_record

        trainer, run_dir = self.trainer, self.run_dir
        real, slots = trainer.global_token_counts()
        peak = peak_memory_bytes(self.runtime.use_cpu)
        peaks = trainer.accelerator.gather(torch.tensor([peak], device=self.args.device)).max().item()
        write_rank_record(trainer, run_dir)

        tmp = run_dir / "model.tmp"
        if self.is_main and tmp.exists():  # left by a run that died while saving
            import shutil

            shutil.rmtree(tmp)
        trainer.accelerator.wait_for_everyone()
        # Training turned the KV cache off; the saved model is for generation: on again.
        trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True
        # Whole weights gathered to rank 0, or one shard per rank (dist.save_format=sharded).
        self.model_format = save_model(trainer, tmp, self.cfg.dist, self.cfg.peft.method, final_dir=run_dir / "model")
        trainer.accelerator.wait_for_everyone()
        if not self.is_main:
            return {}
        self.tokenizer.save_pretrained(tmp)
        outputs.check_weights_written(tmp, self.model_format)
        outputs.publish_dir(tmp, run_dir / "model")

        step_s = self.step_timer.seconds
        metrics = {
            "train_loss": _mean_logged_loss(trainer.state.log_history),
            "eval_loss": self.eval_metrics.get("eval_loss"),
            "train_tokens_per_second": real / step_s if step_s else None,
            "train_tokens": real,
            "padding_fraction": 1 - real / slots if slots else 0.0,
            "peak_memory_bytes": int(peaks),
            "peak_memory_kind": "cpu_max_rss" if self.runtime.use_cpu else "cuda_max_allocated",
            "trainable_params": self.trainable,
            "total_params": self.total,
            "trainable_percent": 100 * self.trainable / self.total,
            "peft_method": self.cfg.peft.method,
            "world_size": self.args.world_size,
            "global_batch_size": self.global_batch,
            "steps": trainer.state.global_step,
            "train_step_seconds": step_s,  # inside optimizer steps; what tokens/s divides by
            "train_runtime_seconds": self.train_seconds,  # wall clock of train(), evals and saves included
            "precision": self.runtime.precision,
            "dist_plan": plan_label(self.cfg.dist),
            "model_format": self.model_format,  # hf | zero_sharded | fsdp_sharded (see model/SHARDED.md)
        }
        for when, res in (("before", self.before), ("after", self.after)):
            if res and res["exact_match"] is not None:
                metrics[f"eval_exact_match_{when}"] = res["exact_match"]
        log_rows = [{"step": r.get("step"), **r} for r in trainer.state.log_history]
        outputs.plot_loss_curve(log_rows, run_dir / "loss_curve.png")
        if self.after:
            outputs.write_jsonl(run_dir / "samples.jsonl", self.after["results"][: max(1, self.cfg.task.generation_eval.num_samples)])
        outputs.write_json(run_dir / "metrics.json", metrics)
        outputs.mark_complete(run_dir)
        log.info("metrics: %s", {k: metrics[k] for k in outputs.METRIC_KEYS})
        if "eval_exact_match_after" in metrics:
            log.info(
                "held-out exact match: %.3f before -> %.3f after training",
                metrics.get("eval_exact_match_before", float("nan")), metrics["eval_exact_match_after"],
            )
        log.info("run directory: %s", run_dir)
        return metrics


def _mean_logged_loss(history):
    """Mean train loss over all steps, resumed ones included: each logged loss
    is the rank-averaged mean over the steps since the previous log line."""
    total, steps, last = 0.0, 0, 0
    for row in history:
        if "loss" in row:
            n = row["step"] - last
            total, steps, last = total + row["loss"] * n, steps + n, row["step"]
    return total / steps if steps else None


def write_run_info(cfg: DictConfig, run_dir: Path, recipe: SFTRecipe) -> None:
    import accelerate
    import peft
    import transformers

    info = {
        "name": cfg.name,
        "model_path": recipe.model_path,
        "batch": recipe.batch_info,
        "precision": recipe.runtime.precision,
        "device": "cpu" if recipe.runtime.use_cpu else torch.cuda.get_device_name(),
        "pad_token_strategy": recipe.pad_strategy,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "accelerate": accelerate.__version__,
        },
    }
    outputs.write_json(run_dir / "run_info.json", info)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    recipe = SFTRecipe(cfg, run_dir)
    recipe.setup()
    if cfg.preflight:
        if recipe.is_main:
            log.info("preflight passed: config, launch, tokenizer, chat template and %d training rows are valid; "
                     "run again without preflight=true to train", recipe.data.train.report["kept"])
        return {}
    if recipe.is_main:
        write_run_info(cfg, run_dir, recipe)
    recipe.train()
    return recipe.save()
