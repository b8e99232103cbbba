"""What every task's recipe does the same way, in the order it happens:

    setup      launch (device, precision, plan, ranks) -> tokenizer -> data* -> model* + PEFT -> trainer*
    train      (resume) train, evaluate
    save       model/ (atomically), metrics.json (+ the task's metrics*), loss curve, COMPLETE

The steps marked * are the task's own: each task file (``sft.py``,
``preference.py``, ``reward.py``, ``grpo.py``, ``encoder.py``) subclasses
``Recipe`` and fills in ``setup_data``, ``load_model``, ``build_trainer`` and
``task_metrics``, so one run reads top to bottom in two files.

Every rank runs this; only rank 0 writes shared files.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List

import torch
from omegaconf import DictConfig

from fttrain import atomic, outputs
from fttrain.errors import FttrainError
from fttrain.plan import Topology, gradient_accumulation, plan_label
from fttrain.plan.check import check_plan
from fttrain.plan.save import save_model
from fttrain.plan.translate import (after_process_group, cpu_collective_timeout, fill_fsdp_wrap_classes,
                                    single_process_rendezvous, trainer_args)
from fttrain.plan.verify import PlanCheck, deepspeed_config_in_use
from fttrain.checkpoints import checkpoint_step, latest_checkpoint
from fttrain.config.checks import ConfigCheckError
from fttrain.env import check_world_size, detect_runtime, is_main_process, peak_memory_bytes
from fttrain.models.load import load_tokenizer, param_counts, resolve_model_path, set_dropout
from fttrain.rendezvous import launch_token, local_main_first
from fttrain.preemption import StopOnSignal, remove_pid_file, requeue_job, signal_name, write_pid_file
from fttrain.loss import gpu_kernel_runtime_problem, liger_family_problem, liger_kernel_config
from fttrain.methods import apply_peft, method_of, optimizer_args, quantization_config, trainer_hooks
from fttrain.tasks import task_of

log = logging.getLogger("fttrain")


def checkpointing_args(on: bool) -> dict:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    # Non-reentrant checkpointing works with frozen inputs (LoRA) without input grads.
    return {f"{prefix}_checkpointing": on, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if on else None}


class Recipe:
    batch_unit = "samples"  # what one row of a micro-batch is, for the batch-arithmetic log line

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.task = task_of(cfg.task)  # the task's declaration (fttrain.tasks)
        self.eval_metrics: Dict = {}

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        self.setup_launch()
        # Local rank 0 builds the tiny model or generated data once; the others wait, then reuse it.
        with local_main_first("preparing the model files"):
            self.model_path = resolve_model_path(self.cfg.model)
        self.tokenizer, self.pad_strategy = load_tokenizer(self.cfg.model, self.model_path)
        self.check_model_config()
        self.setup_chat_template()
        with local_main_first("data preparation"):
            self.setup_data()
        if self.is_main:
            log.info("data: %s", self.data_report)
            if not self.cfg.preflight:
                atomic.write_json(self.run_dir / "data_report.json", self.data_report)
        if self.cfg.preflight:
            return
        self.setup_model()
        fill_fsdp_wrap_classes(self.args, self.model, self.cfg.dist)
        self.trainer = self.build_trainer()
        self.trainer.keep_checkpoints = self.cfg.trainer.save_total_limit  # applied after each complete save
        if self.cfg.trainer.loss == "liger" and hasattr(self.trainer, "eval_forward_kwargs"):
            self.trainer.eval_forward_kwargs = {"skip_logits": True}  # Liger's eval forward: no whole logits either
        self.trainer.manifest_hashes = self.cfg.trainer.verify_checkpoints == "hash"
        self.plan_check.trainer = self.trainer
        self.stop_on_signal.trainer = self.trainer  # its non-finite steps are polled with the stop signals
        for cb in self.hooks.callbacks:
            cb.trainer = self.trainer

    def setup_launch(self) -> None:
        cfg = self.cfg
        self.runtime = detect_runtime(cfg.precision)
        self.topology = Topology.from_env()
        # Invalid plans and unreachable batch sizes stop here, before any process group starts.
        check_plan(cfg, self.topology, self.runtime.precision, on_gpu=not self.runtime.use_cpu)
        kernels = gpu_kernel_runtime_problem(cfg.trainer, on_gpu=not self.runtime.use_cpu,
                                             precision=self.runtime.precision)
        if kernels:
            raise ConfigCheckError([kernels])
        self.accum = gradient_accumulation(cfg.trainer, self.topology.world_size)
        single_process_rendezvous(cfg.dist)
        cpu_collective_timeout(cfg.dist, self.runtime.use_cpu)
        self.args = self.training_args()  # initialises the process group
        check_world_size(self.args.world_size, self.topology.world_size, cfg.dist)
        after_process_group(cfg.dist, self.runtime.use_cpu)
        self.is_main = is_main_process()
        self.launch_token = launch_token()  # shared by this launch's ranks: names its unshared data folder
        # Handlers first, so a signal during model loading still ends in a clean stop.
        self.stop_on_signal = StopOnSignal(cfg.trainer.stop_signals, cfg.trainer.requeue_signals,
                                           cfg.trainer.stop_check_steps)
        if self.is_main and not cfg.preflight:
            write_pid_file(self.run_dir)
        self._batch_arithmetic()

    chat_template = None  # the template this run trains with and saves (None: no chat data)

    def check_model_config(self) -> None:
        """What the model's config.json says against the run's settings, before any weights load."""
        from transformers import AutoConfig

        from fttrain.config.checks import ConfigCheckError, length_problems

        config = AutoConfig.from_pretrained(self.model_path, revision=self.cfg.model.revision,
                                            trust_remote_code=self.cfg.model.trust_remote_code)
        problems = length_problems(self.cfg, config)
        problems += filter(None, [liger_family_problem(self.cfg.trainer, config.model_type)])
        if problems:
            raise ConfigCheckError(problems)

    def setup_chat_template(self) -> None:
        """data.chat_template resolved and checked against this tokenizer. It
        becomes the tokenizer's template: TRL's trainers render with it, and it
        is saved with the model, so inference prompts in the trained format."""
        from fttrain.config.checks import check_tokenizer_template
        from fttrain.data.templates import TOKENIZER, describe_choice, resolve_chat_template

        if self.task.encoder:  # an encoder task's rows never go through a chat template
            return
        template = resolve_chat_template(self.cfg.data.chat_template, self.tokenizer)
        check_tokenizer_template(self.cfg, self.tokenizer, template)
        if template is None:
            return
        line, differs = describe_choice(self.cfg.data.chat_template, template, self.tokenizer)
        if self.is_main:
            if differs:
                log.warning("%s: training on it teaches the model a format its own template does not write; the "
                            "model folder is saved with the training template, so use that one for inference", line)
            else:
                log.info(line)
        if self.cfg.data.chat_template != TOKENIZER:  # the model's own stays as it is (a named set stays whole)
            self.tokenizer.chat_template = template
        self.chat_template = template

    def setup_data(self) -> None:
        """Sets self.data_report (and the task's own data attributes)."""
        raise NotImplementedError

    def load_model(self, precision: str, quantization_config):
        """The base model the task trains, before PEFT."""
        raise NotImplementedError

    def setup_model(self) -> None:
        cfg = self.cfg
        # Seed before any weight is created: adapter init (LoRA A) and new heads
        # draw from the global RNG, and runs must start from the same weights.
        from transformers import set_seed

        set_seed(cfg.trainer.seed)
        quant = quantization_config(cfg.peft, self.runtime.precision)
        # Frozen base weights may live in bf16; trained weights of the model
        # itself (full, freeze, LISA, GaLore) stay fp32 masters under autocast.
        load_precision = "bf16" if self.runtime.precision == "bf16" and not method_of(cfg.peft).whole_model else "fp32"
        model = self.load_model(load_precision, quant)
        if cfg.model.dropout is not None:
            n = set_dropout(model, cfg.model.dropout)
            log.info("model.dropout=%s set on %d dropout modules", cfg.model.dropout, n)
        model.config.use_cache = False  # packed batches and checkpointing both need it off
        self.model = apply_peft(model, cfg.peft, cfg.trainer.gradient_checkpointing, task_type=self.task.peft_task_type,
                                max_steps=cfg.trainer.max_steps, base_path=self.model_path)
        if liger_kernel_config(cfg.trainer) is not None:
            from fttrain.loss import use_liger

            use_liger(self.model, cfg.trainer)
        if cfg.trainer.loss == "chunked":
            from fttrain.loss import use_chunked_loss

            use_chunked_loss(self.model, cfg.trainer.loss_chunk_tokens)
        elif cfg.trainer.loss == "cce":
            from fttrain.loss import use_cce_loss

            use_cce_loss(self.model)
        # Callbacks (LISA's layer draws, AdaLoRA's budget) and LoRA+ parameter groups.
        self.hooks = trainer_hooks(self.model, cfg.peft, cfg.trainer)
        self.trainable, self.total = param_counts(self.model)
        if self.hooks.trainable is not None:
            self.trainable = self.hooks.trainable()
        if self.is_main:
            log.info("parameters (peft=%s): %d trainable of %d (%.4f%%)",
                     cfg.peft.method, self.trainable, self.total, 100 * self.trainable / self.total)

    def training_args(self):
        """The TrainingArguments every task shares, built as the task's own
        arguments class (TRL's configs subclass TrainingArguments)."""
        from transformers import TrainingArguments

        cls, extra = self.training_args_class(), self.task_training_args()
        cfg, rt, t = self.cfg, self.runtime, self.cfg.trainer
        has_eval = cfg.data.eval is not None or cfg.data.eval_fraction > 0
        from fttrain.trackers import passed_to_transformers

        kwargs = dict(
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
            # The Trainer would test every micro-batch's loss for NaN/inf (a device
            # sync each) to hide it from the logged mean; a NaN stays visible instead.
            logging_nan_inf_filter=False,
            torch_compile=t.compile,
            torch_compile_backend=t.compile_backend if t.compile else None,
            eval_strategy="steps" if (t.eval_steps and has_eval) else "no",
            eval_steps=t.eval_steps,
            save_strategy="steps" if t.save_steps else "no",
            save_steps=t.save_steps or 500,
            save_total_limit=None,  # fttrain.checkpoints rotates, after a checkpoint is complete
            bf16=rt.precision == "bf16",
            fp16=rt.precision == "fp16",
            use_cpu=rt.use_cpu,
            # DDP knobs, DeepSpeed JSON or FSDP plan, and where checkpointing happens.
            **trainer_args(cfg, rt.precision, self.topology, self.accum, rt.use_cpu, checkpointing_args),
            seed=t.seed,
            data_seed=t.seed,
            remove_unused_columns=False,
            dataloader_num_workers=t.dataloader_num_workers,
            disable_tqdm=not cfg.logger.progress_bar,
            report_to=passed_to_transformers(cfg.logger.report_to),  # MLflow, W&B, TensorBoard: fttrain.trackers
        )
        kwargs.update(extra)
        return (cls or TrainingArguments)(**kwargs)

    def training_args_class(self):
        """None: transformers' TrainingArguments; TRL tasks return their config class."""
        return None

    def task_training_args(self) -> dict:
        """Task knobs merged into the arguments (loss normalisation, TRL's beta, ...)."""
        return {}

    def _batch_arithmetic(self) -> None:
        t, world = self.cfg.trainer, self.args.world_size
        accum = self.args.gradient_accumulation_steps
        self.global_batch = t.micro_batch_size * accum * world
        max_len = self.cfg.data.max_length
        self.batch_info = {
            "micro_batch_size": t.micro_batch_size,
            "gradient_accumulation_steps": accum,
            "world_size": world,
            "global_batch_size": self.global_batch,
            "global_batch_unit": self.batch_unit,
            "max_tokens_per_step": self.global_batch * max_len,
        }
        if self.is_main:
            log.info(
                "global batch = %d micro x %d accumulation x %d rank(s) = %d %s per step; <= %d x %d = %d tokens per step",
                t.micro_batch_size, accum, world, self.global_batch, self.batch_unit, self.global_batch, max_len,
                self.global_batch * max_len,
            )

    def build_trainer(self):
        raise NotImplementedError

    def trl_trainer(self, trainer_cls, count_keys=("attention_mask",), **kwargs):
        """A TRL trainer over this run's model, arguments and tokenizer, with
        fttrain's token accounting and the method's parameter groups (LoRA+'s
        B-matrix rate). count_keys: the batch masks that together cover each
        sequence once."""
        from fttrain.trainer import with_fttrain_accounting

        cls = with_fttrain_accounting(trainer_cls, count_keys)
        cls.param_groups = staticmethod(self.hooks.param_groups) if self.hooks.param_groups else None
        trainer = cls(model=self.model, args=self.args, processing_class=self.tokenizer, **kwargs)
        trainer.setup_accounting(self.cfg.trainer.rank_records)
        return trainer

    def callbacks(self, *task_callbacks) -> List:
        """Method callbacks first (LISA adds its layer draw to the log line the
        JSONL logger writes), then the output contract's, then the task's."""
        from fttrain.trackers import RunTrackers, TrackerCallback, ours
        from fttrain.trainer import JsonlLogCallback, ResumePlan, StepTimer, StepWatchdog

        self.trackers = RunTrackers(ours(self.cfg.logger.report_to), self.run_dir)
        tracking = [TrackerCallback(self.trackers, self.cfg)] if self.trackers.names else []
        self.step_timer = StepTimer()
        self.watchdog = StepWatchdog(self.run_dir, self.args.process_index, self.cfg.trainer.step_timeout_seconds)
        self.resume_plan = ResumePlan()
        self.plan_check = PlanCheck(self.cfg.dist, getattr(self.model.config, "num_hidden_layers", None),
                                    self._record_plan, checkpointing=self.cfg.trainer.gradient_checkpointing)
        return [*self.hooks.callbacks, JsonlLogCallback(self.run_dir / "train_log.jsonl"), *tracking,
                self.step_timer, self.plan_check, self.stop_on_signal, self.watchdog, self.resume_plan,
                *task_callbacks]

    def _record_plan(self, realised: dict) -> None:
        """The verified plan, with the DeepSpeed JSON as run (auto values filled), in plan.json."""
        if not self.is_main:
            return
        record = {"plan": plan_label(self.cfg.dist), "realised": realised,
                  "deepspeed_config": deepspeed_config_in_use(self.trainer)}
        log.info("plan %s verified: %s", record["plan"], realised)
        atomic.write_json(self.run_dir / "plan.json", record)

    def on_main(self, what: str, fn):
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

    # ------------------------------------------------------------ train
    def has_eval(self) -> bool:
        return self.trainer.eval_dataset is not None

    def train(self) -> None:
        cfg = self.cfg
        resume = cfg.resume_from
        if resume == "auto":
            resume = self.checkpoint_to_resume()
            if resume is None and self.is_main:
                log.info("resume_from=auto: no complete checkpoint in %s yet, starting from step 0",
                         self.run_dir / "checkpoints")
        self.resume_plan.checkpoint = resume
        if resume is not None:
            from fttrain.trackers import TrackerCallback
            from fttrain.trainer import JsonlLogCallback

            step = checkpoint_step(resume)
            for cb in self.trainer.callback_handler.callbacks:
                if isinstance(cb, (JsonlLogCallback, TrackerCallback)):
                    cb.resume_step = step
            log.info("resuming from %s (step %d)", resume, step)
            self.before_resume(Path(resume), step)
        if self.stop_on_signal.stop_before_training(self.args.device, checkpoint_step(resume) if resume else 0):
            return  # finish_stopped requeues if asked; a resume starts where this run would have
        start = time.time()
        from fttrain.trainer import NothingLeftToTrain

        try:
            self.trainer.train(resume_from_checkpoint=resume)
        except NothingLeftToTrain as done:
            log.info("%s is the last planned step (%s): nothing left to train; evaluating and saving", resume, done)
            trainer = self.trainer  # what the Trainer's own end of training would have done
            trainer.is_in_train = False
            trainer.control = trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
        finally:
            self.watchdog.close()  # a failed step must not leave a watchdog armed in this process
        self.train_seconds = time.time() - start
        if self.stop_on_signal.diverged_at is not None:
            raise diverged(self.run_dir, self.stop_on_signal.diverged_at, "the loss or gradient norm")
        if self.stop_on_signal.stopped:  # a checkpoint was written; the final eval and save wait for the resume
            return
        self.eval_metrics = self.trainer.evaluate() if self.has_eval() else {}
        self.after_training()

    def checkpoint_to_resume(self):
        """resume_from=auto: the newest checkpoint that verifies, chosen by rank 0 (one
        reading of the files) and told to every rank, so all resume from the same one."""
        from fttrain.checkpoints import CheckpointError, complete_checkpoints

        def choose():
            found = latest_checkpoint(self.run_dir, hashes=self.cfg.trainer.verify_checkpoints == "hash")
            if found is None and complete_checkpoints(self.run_dir):
                return CheckpointError(
                    f"no checkpoint in {self.run_dir / 'checkpoints'} passes verification (each is named above with "
                    "what is wrong): resume_from=PATH one you trust, or start over with overwrite=true")
            return str(found) if found else None

        chosen = [choose() if self.is_main else None]
        if self.args.world_size > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(chosen, from_process=0)
        if isinstance(chosen[0], CheckpointError):
            raise chosen[0]
        return chosen[0]

    def before_resume(self, checkpoint: Path, step: int) -> None:
        """The task's own state from the checkpoint it resumes from (a data stream's position)."""

    def after_training(self) -> None:
        """The task's own measurement after training (generations, held-out
        reward, ...); skipped when a stop signal ended the run, whose time
        before the limit is for the checkpoint and the requeue."""

    # ------------------------------------------------------------- save
    def finish_stopped(self) -> dict:
        """After a stop signal the checkpoint is written (all ranks). When the
        signal asks for it under Slurm, rank 0 requeues the job as the very last
        step (Slurm ends the job's processes right after), and every rank exits
        with status 0 without returning a result: a sweep launcher must not
        count a requeued trial as finished."""
        stop = self.stop_on_signal
        self.trainer.accelerator.wait_for_everyone()
        if not stop.should_requeue():
            if self.is_main:
                log.info("stopped after step %d; continue with resume_from=auto", stop.stopped_at)
            return {"stopped_by_signal": signal_name(stop.stop_signal), "steps": stop.stopped_at}
        if self.is_main:
            remove_pid_file(self.run_dir)
            try:
                log.info("requeueing Slurm job %s; it resumes from step %d", requeue_job(), stop.stopped_at)
            except RuntimeError as e:  # e.g. an interactive allocation, which cannot be requeued
                log.error("%s; the checkpoint of step %d is complete: resubmit to continue", e, stop.stopped_at)
        raise SystemExit(0)

    def token_counts(self):
        """(real tokens, token slots) trained on, over all ranks."""
        return self.trainer.global_token_counts()

    def save(self) -> dict:
        from fttrain.trainer import write_rank_record

        trainer, run_dir = self.trainer, self.run_dir
        real, slots = self.token_counts()
        peak = peak_memory_bytes(self.runtime.use_cpu)
        peaks = trainer.accelerator.gather(torch.tensor([peak], device=self.args.device)).max().item()
        write_rank_record(trainer, run_dir)

        bad = nonfinite_weights(trainer)
        if bad:
            raise diverged(run_dir, trainer.state.global_step, f"the weights ({bad})")
        tmp = run_dir / "model.tmp"
        if self.is_main and tmp.exists():  # left by a run that died while saving
            import shutil

            shutil.rmtree(tmp)
        trainer.accelerator.wait_for_everyone()
        # Training turned the KV cache off; a saved causal LM is for generation: on again.
        trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True
        # Whole weights gathered to rank 0, or one shard per rank (dist.save_format=sharded).
        self.model_format = save_model(trainer, tmp, self.cfg.dist, self.cfg.peft.method, final_dir=run_dir / "model")
        trainer.accelerator.wait_for_everyone()
        if not self.is_main:
            return {}
        self.tokenizer.save_pretrained(tmp)
        self.save_extra_files(tmp)
        outputs.check_weights_written(tmp, self.model_format)
        atomic.sync_folder(tmp)  # on disk before it is published: a power loss cannot leave empty files
        atomic.publish_dir(tmp, run_dir / "model")
        atomic.sync_dir(run_dir)

        step_s = self.step_timer.seconds
        metrics = {
            "task": self.cfg.task.name,
            "train_loss": mean_logged_loss(trainer.state.log_history),
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
            # what was planned: resume_from=auto continues a finished run only when the plan grew
            "planned": {"max_steps": self.cfg.trainer.max_steps, "num_epochs": self.cfg.trainer.num_epochs},
            "train_step_seconds": step_s,  # inside optimizer steps; what tokens/s divides by
            # the first of them in this process: torch.compile's compilation (trainer.compile) and warm-up
            "first_step_seconds": self.step_timer.first_step_seconds,
            "train_runtime_seconds": self.train_seconds,  # wall clock of train(), evals and saves included
            "precision": self.runtime.precision,
            "dist_plan": plan_label(self.cfg.dist),
            "model_format": self.model_format,  # hf | zero_sharded | fsdp_sharded (see model/SHARDED.md)
        }
        metrics.update(self.task_metrics())
        log_rows = [{"step": r.get("step"), **r} for r in trainer.state.log_history]
        outputs.plot_loss_curve(log_rows, run_dir / "loss_curve.png")
        atomic.write_json(run_dir / "metrics.json", metrics)
        outputs.mark_complete(run_dir)  # model and metrics are whole: a failed evaluation below keeps them
        try:
            metrics.update(self.evaluate_harness())
        finally:
            self.trackers.finish(metrics, trainer.state.global_step)
        log.info("metrics: %s", {k: metrics.get(k) for k in outputs.METRIC_KEYS})
        self.log_task_summary(metrics)
        log.info("run directory: %s", run_dir)
        return metrics

    def evaluate_harness(self) -> dict:
        """harness.tasks: lm-evaluation-harness on the trained model in memory (the other
        ranks have returned); its flat numbers join metrics.json. fttrain/harness.py."""
        if not self.cfg.harness.tasks:
            return {}
        import gc

        from fttrain.harness import after_training

        # Training is over and saved: a stop signal (scancel, preemption) now ends the process at once,
        # leaving eval_harness_error.txt, instead of being noted for a step that never comes.
        self.stop_on_signal.restore()
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        # The optimizer's state (for full fine-tuning, twice the weights) is not needed to evaluate.
        trainer.accelerator.free_memory()
        trainer.optimizer = trainer.lr_scheduler = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return after_training(model, self.tokenizer, self.cfg.harness, self.run_dir)

    def save_extra_files(self, folder: Path) -> None:
        """Task files that belong with the model (label maps, reward functions)."""

    def task_metrics(self) -> dict:
        """The task's own numbers for metrics.json (eval metrics, before/after)."""
        return {}

    def log_task_summary(self, metrics: dict) -> None:
        pass


class DivergedError(FttrainError, RuntimeError):
    """Training produced a non-finite loss, gradient norm or weights: nothing was saved as finished."""


def diverged(run_dir: Path, step: int, what: str) -> DivergedError:
    from fttrain.checkpoints import complete_checkpoints, checkpoint_step

    good = [p for p in complete_checkpoints(run_dir) if checkpoint_step(p) < step]
    keep = (f"the last good checkpoint is {good[-1]} (resume_from={good[-1]} with the fix)" if good
            else "there is no checkpoint from before it")
    return DivergedError(
        f"training diverged: {what} was not finite at step {step}. No model was saved and the run is not marked "
        f"complete; {keep}. Lower trainer.learning_rate, keep trainer.max_grad_norm > 0, or use bf16 instead of fp16"
    )


def nonfinite_weights(trainer) -> str:
    """The first trainable tensor (of this rank's shard) holding NaN or inf, agreed
    over ranks: '' when all are finite. One pass over the trainable weights."""
    model = trainer.accelerator.unwrap_model(trainer.model)

    def local(p):  # this rank's part, without a collective: ZeRO-3's ds_tensor shard, FSDP2's local shard
        if getattr(p, "ds_tensor", None) is not None:
            return p.ds_tensor
        return p.to_local() if hasattr(p, "to_local") else p

    name = next((n for n, p in model.named_parameters()
                 if p.requires_grad and local(p).numel() and not bool(torch.isfinite(local(p).detach()).all())), "")
    flag = torch.tensor([1.0 if name else 0.0], device=trainer.args.device)
    if trainer.args.world_size > 1:
        flag = trainer.accelerator.reduce(flag, reduction="sum")
    return name or ("on another rank" if float(flag) > 0 else "")


def mean_logged_loss(history):
    """Mean train loss over all steps, resumed ones included: each logged loss
    is the rank-averaged mean over the steps since the previous log line."""
    total, steps, last = 0.0, 0, 0
    for row in history:
        if "loss" in row:
            n = row["step"] - last
            total, steps, last = total + row["loss"] * n, steps + n, row["step"]
    return total / steps if steps else None


def eval_metrics_with_prefix(metrics: dict, prefix: str = "eval_") -> dict:
    """The task's eval numbers from trainer.evaluate(), minus the Trainer's timing keys."""
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch")
    return {k: v for k, v in metrics.items() if k.startswith(prefix) and not k.endswith(skip)}
