"""Preference optimisation (tasks ``dpo``, ``kto``, ``orpo``) with TRL's trainers;
the shared steps are in ``base.py``:

    data       prompt / chosen / rejected rows, validated (``data/preference.py``);
               TRL applies the chat template and tokenizes; KTO splits each pair
               into a desirable and an undesirable example
    model      AutoModelForCausalLM + PEFT; the reference (dpo, kto) is a frozen
               copy of the starting adapter on the same base (PEFT), the start
               model loaded again (full fine-tuning), or task.reference
    train      TRL's trainer with fttrain's callbacks; eval reward accuracy and margin
    save       model/ as for sft; metrics.json with eval_rewards/accuracies, eval_rewards/margins

ORPO has no reference model: its loss is SFT on chosen plus an odds-ratio term.
"""

from __future__ import annotations

import logging

from fttrain.config.schema import value_of
from fttrain.data.preference import PreferenceRows, UnpairedRows
from fttrain.data.rows import convert_rows, load_splits
from fttrain.data.sources import DataError
from fttrain.models.load import load_model
from fttrain.methods import method_of
from fttrain.recipes.base import Recipe, eval_metrics_with_prefix

log = logging.getLogger("fttrain")

def unpair(rows, seed: int):
    """KTO's unpaired form: (prompt, chosen) desirable, (prompt, rejected)
    undesirable, shuffled with the run's seed. (Given pairs, TRL unpairs them
    itself but keeps all desirable rows before all undesirable ones, so each
    batch would hold one label only.)"""
    import random

    out = []
    for r in rows:
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    random.Random(seed).shuffle(out)
    return out


class PreferenceRecipe(Recipe):
    @property
    def batch_unit(self):
        return "examples (each pair split in two)" if self.task.trl_trainer.unpaired else "pairs"

    # ------------------------------------------------------------ data
    def setup_data(self) -> None:
        data = self.cfg.data
        unpaired = value_of(data.format) == "unpaired"  # KTO rows that each judge one completion
        rows = UnpairedRows(data.columns, data.role_map) if unpaired else \
            PreferenceRows(data.columns, data.role_map, prompt_required=True)
        train_split, eval_split = load_splits(data)
        self.train_rows, _, train_report = convert_rows(train_split, rows, data.strict)
        self.data_report = {"train": {**train_report, **self._length_report(self.train_rows)}}
        self.eval_rows = None
        if eval_split is not None:
            self.eval_rows, _, eval_report = convert_rows(eval_split, rows, data.strict)
            self.data_report["eval"] = {**eval_report, **self._length_report(self.eval_rows)}
        if self.task.trl_trainer.unpaired and not unpaired:
            self.train_rows = unpair(self.train_rows, self.cfg.trainer.seed)
            self.eval_rows = unpair(self.eval_rows, self.cfg.trainer.seed) if self.eval_rows else None
        if self.task.trl_trainer.unpaired:
            desirable = sum(r["label"] for r in self.train_rows)
            self.data_report["train"].update(kto_examples=len(self.train_rows), desirable=desirable,
                                             undesirable=len(self.train_rows) - desirable)
            if desirable in (0, len(self.train_rows)):
                raise DataError(f"{data.train}: every KTO example is {'desirable' if desirable else 'undesirable'}; "
                                "KTO needs both labels")

    def _length_report(self, rows) -> dict:
        """How many rows TRL will cut at data.max_length (it truncates the end
        silently), so the cut is counted in data_report.json."""
        limit, longest, over = self.cfg.data.max_length, 0, 0
        for row in rows:
            n = max(self._tokens(row["prompt"], row[k]) for k in ("chosen", "rejected", "completion") if k in row)
            longest, over = max(longest, n), over + (n > limit)
        return {"longest_sequence_tokens": longest, "truncated_at_max_length": over}

    def _tokens(self, prompt, completion) -> int:
        if isinstance(prompt, list):
            ids = self.tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
            return len(ids)
        return len(self.tokenizer(prompt + completion)["input_ids"]) + 1  # + EOS

    # ----------------------------------------------------------- model
    def load_model(self, precision, quantization_config):
        return load_model(self.cfg.model, self.model_path, precision, quantization_config=quantization_config)

    def training_args_class(self):
        return self.task.trl_trainer.classes()[1]

    def task_training_args(self) -> dict:
        t = self.cfg.task
        args = {"beta": t.beta, "max_length": self.cfg.data.max_length,
                # The Trainer's own checkpointing knob is set by fttrain (trainer.gradient_checkpointing).
                "disable_dropout": True}
        return {**args, **self.task.trl_trainer.args(t)}

    def reference_model(self):
        """None with an adapter: TRL adds a frozen copy of the starting adapter.
        Otherwise a frozen model: task.reference, or the start model loaded again."""
        t = self.cfg.task
        if not self.task.trl_trainer.reference or (t.reference == "auto" and not method_of(self.cfg.peft).whole_model):
            return None
        precision = "bf16" if self.runtime.precision == "bf16" else "fp32"
        if t.reference == "auto":
            ref = load_model(self.cfg.model, self.model_path, precision)
        else:
            from fttrain.models.load import DTYPES, load_causal_lm

            ref = load_causal_lm(t.reference, DTYPES[precision], trust_remote_code=self.cfg.model.trust_remote_code)
        ref.requires_grad_(False)
        return ref.eval()

    def build_trainer(self):
        from datasets import Dataset

        trainer_cls, _ = self.task.trl_trainer.classes()
        kwargs = {}
        if self.task.trl_trainer.reference:
            kwargs["ref_model"] = self.reference_model()
        return self.trl_trainer(
            trainer_cls,
            self.task.trl_trainer.count_keys,  # the batch's masks that cover each sequence once
            train_dataset=Dataset.from_list(self.train_rows),
            eval_dataset=Dataset.from_list(self.eval_rows) if self.eval_rows else None,
            callbacks=self.callbacks(),
            **kwargs,
        )


    # ------------------------------------------------------------- save
    def save_extra_files(self, folder) -> None:
        # Given a PeftModel, TRL keeps a frozen copy of the adapter as it
        # started ("ref", the reference) and saves it beside the trained one;
        # it is the start state, not a result.
        import shutil

        if (folder / "ref").is_dir():
            shutil.rmtree(folder / "ref")

    def task_metrics(self) -> dict:
        metrics = eval_metrics_with_prefix(self.eval_metrics)
        return {k: v for k, v in metrics.items() if k != "eval_loss"}

    def log_task_summary(self, metrics: dict) -> None:
        acc, margin = metrics.get("eval_rewards/accuracies"), metrics.get("eval_rewards/margins")
        if acc is not None:
            log.info("held-out preference: reward accuracy %.3f, mean margin %.4f", acc, margin or float("nan"))

