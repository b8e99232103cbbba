"""Knowledge distillation (``task=distill``): SFT's data and student, plus a teacher.

    data      as sft: formatted, masked, packed rows; the teacher scores the same tokens
    check     the teacher's tokenizer must be the student's (before any weights load)
    model     the student (+ PEFT) as for sft; the teacher (task.teacher, + task.teacher_adapter)
              in eval mode, without gradients, whole on every rank
    precompute (task.precompute_teacher) the teacher's top-k logits of both splits to
              RUN/teacher_topk/, then the teacher is freed
    train     FTTrainer's loop with (1 - alpha) CE + alpha T^2 D(teacher, student) (fttrain/distill.py);
              on task.on_policy of the steps the student answers the prompts itself and
              the loss is T^2 D(teacher, student) on its answers (GKD)
    eval      eval_loss (the labels' cross-entropy) and eval_teacher_kl
"""

from __future__ import annotations

import gc
import logging

import torch

from fttrain.distill import (DistillLossSpec, DistillTrainer, OnPolicy, TopKCollator, WithTeacherTopK, load_teacher,
                             load_teacher_tokenizer, precompute_top_k, read_top_k, vocab_width, vocabulary_problem)
from fttrain.recipes.sft import SFTRecipe
from fttrain.rendezvous import main_first

log = logging.getLogger("fttrain")


class DistillRecipe(SFTRecipe):
    teacher = None
    width = None  # logit columns compared between student and teacher
    top_k = None  # {"train": TopKStore, "eval": TopKStore} with task.precompute_teacher

    def check_model_config(self) -> None:
        from fttrain.config.checks import ConfigCheckError

        super().check_model_config()
        problem = vocabulary_problem(self.tokenizer, load_teacher_tokenizer(self.cfg.task), self.cfg.task.teacher)
        if problem:
            raise ConfigCheckError([problem])

    def setup_model(self) -> None:
        super().setup_model()
        task = self.cfg.task
        dtype = torch.bfloat16 if self.runtime.precision == "bf16" else torch.float32
        self.teacher = load_teacher(task, dtype, self.args.device)
        self.width = vocab_width(self.model, self.teacher, self.tokenizer)
        if self.is_main:
            n = sum(p.numel() for p in self.teacher.parameters())
            log.info("distill: teacher %s%s, %d parameters (student: %d), loss=%s at temperature %g, alpha=%g%s",
                     task.teacher, f" + {task.teacher_adapter}" if task.teacher_adapter else "", n, self.total,
                     DistillLossSpec.of(task).kind, task.temperature, task.alpha,
                     f", teacher cut to its top {task.top_k}" if task.top_k else "")
        if task.precompute_teacher:
            self.precompute_teacher()

    def precompute_teacher(self) -> None:
        """Rank 0 scores both splits once (kept across resumes while rows and teacher match);
        every rank then reads the files, and the teacher is freed."""
        task = self.cfg.task
        source = {"teacher": task.teacher, "teacher_adapter": task.teacher_adapter,
                  "dtype": str(next(self.teacher.parameters()).dtype), "vocab": self.width}
        splits = {"train": self.data.train.rows, "eval": self.data.eval.rows if self.data.eval else None}
        folder = self.run_dir / "teacher_topk"
        # Rank 0 writes while the others wait outside the process group's timeout: a
        # large teacher over a large split can take longer than dist.timeout_minutes.
        with main_first("the teacher's top-k logits"):
            for split, rows in splits.items() if self.is_main else ():
                if rows is None or read_top_k(folder / split, rows, task.top_k, source) is not None:
                    continue
                meta = precompute_top_k(self.teacher, rows, task.top_k, folder / split,
                                        self.cfg.trainer.micro_batch_size, self.tokenizer.pad_token_id,
                                        self.args.device, source, self.width)
                log.info("distill: the teacher's top %d at %d trained positions of the %s split: %.1f MiB "
                         "(%d x %d x 6 bytes) in %s", task.top_k, meta["positions"], split, meta["bytes"] / 2**20,
                         meta["positions"], task.top_k, folder / split)
        self.top_k = {split: read_top_k(folder / split, rows, task.top_k, source)
                      for split, rows in splits.items() if rows is not None}
        self.teacher = None
        gc.collect()

    def trainer_setup(self):
        return DistillTrainer, {"teacher": self.teacher, "spec": DistillLossSpec.of(self.cfg.task),
                                "width": self.width, "on_policy": self.on_policy()}

    def on_policy(self):
        task = self.cfg.task
        if not task.on_policy:
            return None
        # The end-of-turn tokens the chat template closes an answer with (the model's
        # generation config lists them for Llama 3's <|eot_id|>), and the tokenizer's eos.
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                      *([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])})
        return OnPolicy(float(task.on_policy), int(task.max_new_tokens), int(self.args.seed),
                        self.tokenizer.pad_token_id, eos or None)

    def training_rows(self):
        train, eval_rows = super().training_rows()
        if self.top_k is None:
            return train, eval_rows
        return (WithTeacherTopK(train, self.top_k["train"]),
                WithTeacherTopK(eval_rows, self.top_k["eval"]) if eval_rows is not None else None)

    def make_collator(self):
        collator = super().make_collator()
        return TopKCollator(collator) if self.top_k is not None else collator

    def task_metrics(self) -> dict:
        metrics = super().task_metrics()
        if "eval_teacher_kl" in self.eval_metrics:
            metrics["eval_teacher_kl"] = self.eval_metrics["eval_teacher_kl"]
        if self.trainer.on_policy is not None:  # steps the student answered itself (this process, since any resume)
            metrics["on_policy_steps"] = self.trainer.on_policy_steps
        return metrics

    def log_task_summary(self, metrics: dict) -> None:
        super().log_task_summary(metrics)
        if "eval_teacher_kl" in metrics:
            log.info("held-out KL(teacher || student): %.4f nats a trained token", metrics["eval_teacher_kl"])
