"""Reward modelling (task ``rm``) with TRL's RewardTrainer; shared steps in ``base.py``:

    data       (prompt,) chosen, rejected rows, validated (``data/preference.py``)
    model      AutoModelForSequenceClassification with one output (a scalar
               score read at the last real token) + PEFT (the head is trained in full)
    train      Bradley-Terry loss -log sigmoid(r_chosen - r_rejected)
    save       model/ (loads with AutoModelForSequenceClassification);
               metrics.json: eval_pairwise_accuracy before and after training,
               mean margin, and TRL's per-batch eval numbers
"""

from __future__ import annotations

import logging

import torch

from fttrain.recipes.base import eval_metrics_with_prefix
from fttrain.recipes.preference import PreferenceRecipe

log = logging.getLogger("fttrain")


class RewardRecipe(PreferenceRecipe):
    batch_unit = "pairs"
    before = after = None  # pairwise accuracy on the eval pairs

    def setup_data(self) -> None:
        from fttrain.data.preference import PreferenceRows
        from fttrain.data.rows import convert_rows, load_splits

        data = self.cfg.data
        rows = PreferenceRows(data.columns, data.role_map, prompt_required=False)
        train_split, eval_split = load_splits(data)
        self.train_rows, _, report = convert_rows(train_split, rows, data.strict)
        self.data_report = {"train": report}
        self.eval_rows = None
        if eval_split is not None:
            self.eval_rows, _, report = convert_rows(eval_split, rows, data.strict)
            self.data_report["eval"] = report

    def load_model(self, precision, quantization_config):
        from transformers import AutoModelForSequenceClassification

        from fttrain.config.schema import value_of
        from fttrain.models.load import DTYPES

        kwargs = {"quantization_config": quantization_config} if quantization_config is not None else {}
        model = AutoModelForSequenceClassification.from_pretrained(
            self.model_path, num_labels=1, dtype=DTYPES[precision], revision=self.cfg.model.revision,
            trust_remote_code=self.cfg.model.trust_remote_code,
            attn_implementation=str(value_of(self.cfg.model.attn_implementation)), **kwargs)
        # The score is read at the last non-pad token: the model must know the pad id.
        model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def training_args_class(self):
        from trl import RewardConfig

        return RewardConfig

    def task_training_args(self) -> dict:
        return {"max_length": self.cfg.data.max_length, "disable_dropout": True,
                "center_rewards_coefficient": self.cfg.task.center_rewards_coefficient}

    def build_trainer(self):
        from datasets import Dataset
        from trl import RewardTrainer

        from fttrain.trainer import AtTrainBegin

        return self.trl_trainer(
            RewardTrainer,
            train_dataset=Dataset.from_list(self.train_rows),
            eval_dataset=Dataset.from_list(self.eval_rows) if self.eval_rows else None,
            callbacks=self.callbacks(AtTrainBegin(self._accuracy_before)),
        )

    # ------------------------------------------------------------ train
    def _accuracy_before(self):
        self.before = self.pairwise_accuracy()

    def after_training(self) -> None:
        self.after = self.pairwise_accuracy()

    @torch.no_grad()
    def pairwise_accuracy(self):
        """Share of eval pairs scored chosen > rejected, over every pair exactly
        once (TRL's eval accuracy is a mean of per-batch means). All ranks run
        it in step, so sharded plans can gather weights."""
        if self.trainer.eval_dataset is None:
            return None
        model = self.trainer.model
        was_training = model.training
        model.eval()
        data, collator = self.trainer.eval_dataset, self.trainer.data_collator
        bs, wins, margins = self.args.per_device_eval_batch_size, 0, []
        for start in range(0, len(data), bs):
            batch = self.trainer._prepare_inputs(collator([data[i] for i in range(start, min(start + bs, len(data)))]))
            scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
            chosen, rejected = scores.float().chunk(2)
            wins += int((chosen > rejected).sum())
            margins += (chosen - rejected).tolist()
        if was_training:
            model.train()
        return {"accuracy": wins / len(data), "margin": sum(margins) / len(margins), "pairs": len(data)}

    # ------------------------------------------------------------- save
    def task_metrics(self) -> dict:
        metrics = {k: v for k, v in eval_metrics_with_prefix(self.eval_metrics).items() if k != "eval_loss"}
        for when, res in (("before", self.before), ("after", self.after)):
            if res:
                metrics[f"eval_pairwise_accuracy_{when}"] = res["accuracy"]
                metrics[f"eval_margin_{when}"] = res["margin"]
        return metrics

    def log_task_summary(self, metrics: dict) -> None:
        if self.after:
            log.info("held-out pairwise accuracy: %.3f before -> %.3f after training (%d pairs)",
                     metrics.get("eval_pairwise_accuracy_before", float("nan")), self.after["accuracy"],
                     self.after["pairs"])

