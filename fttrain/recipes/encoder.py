"""Encoder heads: ClassificationRecipe (task ``cls``), NERRecipe (``ner``) and
QARecipe (``qa``) on the steps EncoderRecipe shares; the run's steps are in ``base.py``:

    data       rows -> label names (task.labels, or sorted from the train rows; ner: O first)
               -> features (``data/encoder.py``): cls and ner one per row; qa one per
               context window (train: the answer's start/end token; eval: also the
               character offsets, to turn logits back into context text)
    model      AutoModelFor{SequenceClassification, TokenClassification, QuestionAnswering}
               with the label maps + PEFT; peft trains and saves the new head in full
               (classifier / qa_outputs)
    train      EncoderTrainer: the head's own loss (a micro-batch mean), or cross-entropy
               with task.class_weights; task metrics over every eval row before training,
               at each trainer.eval_steps, and after training
    save       model/ (+ labels.json for cls/ner); metrics.json with eval_<metric>_before,
               eval_<metric>_after and eval_<metric>; predictions.jsonl (the first eval rows)

The metrics (``fttrain/metrics``), keyed eval_<metric> in logs and metrics.json:

    cls        accuracy, macro_f1, f1/<label>           (argmax)
    cls multi  subset_accuracy, micro_f1, macro_f1, f1/<label>
                                                        (sigmoid > task.threshold or task.thresholds[label])
    ner        precision, recall, f1 (entities), accuracy (words), per type f1/<T> ...
                                                        (each word's tag read at its first sub-token)
    qa         exact_match, f1 (percent, as the SQuAD scripts)
                                                        (best span over a row's windows, task.n_best, ...)

Every rank evaluates the whole eval set: all ranks run the same forward passes
(sharded plans gather weights in each) and get the same numbers.

Two gaps in peft 0.21 are closed here: its QA model drops token_type_ids for
adapter methods (``keep_token_type_ids``; call it on a reloaded QA adapter
too), and with prompt tuning or p-tuning its token-classification and QA
models return logits for the virtual tokens but leave the targets where they
were (``shift_targets``).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np
import torch
from transformers import Trainer

from fttrain import atomic
from fttrain.config.checks import ConfigCheckError
from fttrain.data.encoder import (
    MODEL_INPUTS,
    ClassificationEncoder,
    Encoded,
    NEREncoder,
    QAEncoder,
    collect_label_names,
    encode_rows,
    model_label_config,
)
from fttrain.data.rows import load_splits
from fttrain.data.sources import DataError
from fttrain.data.tokenize import IGNORE
from fttrain.recipes.base import Recipe
from fttrain.checkpoints import AtomicCheckpoints
from fttrain.trainer import MethodParamGroups, NonfiniteWatch, TokenCounting

log = logging.getLogger("fttrain")

# peft's task type decides which head it trains and saves in full next to the adapter.
TARGETS = ("labels", "start_positions", "end_positions")
PREDICTION_ROWS = 16  # eval rows written to predictions.jsonl


class FeatureCollator:
    """Pads what the model takes (inputs, targets). A feature's row id travels
    as ``sample_ids`` for the rank records; offset maps stay behind (the
    evaluation reads them from the features)."""

    def __init__(self, pad):  # DataCollatorWithPadding, or DataCollatorForTokenClassification (pads labels with -100)
        self.pad = pad

    def __call__(self, features: List[Dict]) -> Dict:
        # A plain dict: the token counts look for dicts (tokenizer.pad returns a BatchEncoding).
        batch = dict(self.pad([{k: v for k, v in f.items() if k in MODEL_INPUTS or k in TARGETS} for f in features]))
        if all("example_id" in f for f in features):
            batch["sample_ids"] = [f["example_id"] for f in features]  # a list: read on the host, no device sync
        return batch


def weighted_loss(class_weights: torch.Tensor, multi_label: bool):
    """task.class_weights as a loss (the Trainer's compute_loss_func): cross-entropy
    with a weight per class, or, multi-label, BCE with a weight on each label's positives."""
    import torch.nn.functional as F

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits.float()
        weights = class_weights.to(logits.device)
        if multi_label:
            return F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=weights)
        return F.cross_entropy(logits, labels, weight=weights)

    return loss


def keep_token_type_ids(model) -> None:
    """peft 0.21's PeftModelForQuestionAnswering.forward takes token_type_ids
    (and position_ids) by name and, for adapters (every method but prompt
    learning), never passes them on: BERT would read the context as segment 0
    like the question, in training and in evaluation, and a merged model fed
    the tokenizer's segments would then disagree with the adapter. The adapter
    path is redone here with them passed on."""
    import types

    from peft import PeftModelForQuestionAnswering

    if not isinstance(model, PeftModelForQuestionAnswering) or model.active_peft_config.is_prompt_learning:
        return

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, **kwargs):
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        with self._enable_peft_forward_hooks(**kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    model.forward = types.MethodType(forward, model)


def virtual_token_count(model) -> int:
    """Positions peft's prompt tuning and p-tuning put before the input of a
    token or span model: its logits cover them, its targets are left as they
    were (peft 0.21), so the trainer moves the targets (see shift_targets)."""
    from peft import PeftModel, PeftType

    if not isinstance(model, PeftModel):
        return 0
    config = model.active_peft_config
    return config.num_virtual_tokens if config.peft_type in (PeftType.PROMPT_TUNING, PeftType.P_TUNING) else 0


def shift_targets(inputs: Dict, n: int) -> Dict:
    """Targets for logits with n virtual tokens in front: token labels get n
    ignored positions first (ner), answer positions move n on (qa; 0, the
    no-answer [CLS], becomes n, where [CLS] now is)."""
    out = dict(inputs)
    if "labels" in out:
        labels = out["labels"]
        out["labels"] = torch.cat([labels.new_full((labels.shape[0], n), IGNORE), labels], dim=1)
    for key in ("start_positions", "end_positions"):
        if key in out:
            out[key] = out[key] + n
    return out


class EncoderTrainer(AtomicCheckpoints, NonfiniteWatch, MethodParamGroups, TokenCounting, Trainer):
    """The Trainer with real/padded token counts, rank records, LoRA+ groups,
    and an evaluate() that computes the task's metrics (the recipe's task_eval).

    Loss: each micro-batch's loss is the head's mean (over rows; for ner over
    labelled tokens), divided by the accumulation steps. num_items_in_batch is
    not passed on: these heads ignore it, and the Trainer would then skip that
    division and scale the gradient by the accumulation steps.
    """

    count_keys = ("attention_mask",)
    loss_is_scaled_for_ga = False  # a micro-batch mean: training_step divides by accumulation
    virtual_tokens = 0  # ner/qa with prompt tuning or p-tuning: see virtual_token_count

    def __init__(self, *args, task_eval, param_groups=None, **kwargs):
        self.task_eval = task_eval  # () -> {metric: value}, over the whole eval set
        self.param_groups = param_groups  # (lr, weight_decay) -> groups; None: the Trainer's own grouping
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sample_ids = inputs.pop("sample_ids", None)
        if model.training and self.rank_records and sample_ids is not None:
            self.seen_sample_ids.append(list(sample_ids))
        if self.virtual_tokens:
            inputs = shift_targets(inputs, self.virtual_tokens)
        # TokenCounting counts the masks; the Trainer calls the model (its own
        # loss) or compute_loss_func (class weights) on the labels.
        return super().compute_loss(model, inputs, return_outputs=return_outputs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Loss and task metrics over every eval row, logged as eval_<metric>."""
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.task_eval().items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class EncoderRecipe(Recipe):
    """The steps every head shares; ClassificationRecipe, NERRecipe and
    QARecipe (the tasks' recipes in fttrain.tasks) say what differs."""

    auto_model = ""  # the transformers Auto class of the head
    label_field: Optional[str] = None  # the column whose values are the label names; None: no labels (qa)
    summary_metrics: tuple = ()  # the numbers the run's last log lines compare before and after training
    shifts_targets = True  # targets per token or position: move them past prompt tuning's virtual tokens
    multi_label = False  # one label per row (a softmax); ClassificationRecipe reads task.multi_label
    before = None  # eval metrics at train begin
    predictions: List[Dict] = []  # per eval row, from the latest evaluation

    # ------------------------------------------------------------ data
    def setup_data(self) -> None:
        data = self.cfg.data
        train_split, eval_split = load_splits(data)
        self.label_names = self._label_names(train_split)
        try:
            encode_train, encode_eval = self.make_encoders()
        except ValueError as e:  # too few or repeated labels, a slow tokenizer
            raise ConfigCheckError([f"task={self.cfg.task.name}: {e}"]) from None
        # example_id: a feature's row, for rank records, NER words and QA windows.
        options = dict(strict=data.strict, keep_example_ids=True, overlength=data.overlength)
        train = encode_rows(encode_train, train_split.rows, train_split.ids, train_split.source, **options)
        self.train_features = train.features
        self.data_report = {"train": train.report}
        self.eval_rows = self.eval_features = None
        if eval_split is not None:
            evaluation = encode_rows(encode_eval, eval_split.rows, eval_split.ids, eval_split.source, **options)
            self.eval_rows, self.eval_features = eval_split.rows, evaluation.features  # rows by example_id
            self.data_report["eval"] = evaluation.report
        if self.label_names is not None:
            self.data_report["labels"] = self.label_names
        if self.is_main:
            for split in ("train", "eval"):
                cut = self.data_report.get(split, {}).get("truncated", 0)
                if cut:
                    log.warning("%s: %d %s", split, cut, self.truncated_what())

    def truncated_what(self) -> str:
        return f"rows cut at data.max_length={self.cfg.data.max_length}"

    def _label_names(self, split) -> Optional[List[str]]:
        task, columns = self.cfg.task, self.cfg.data.columns
        if self.label_field is None:
            return None
        if task.labels is not None:
            return list(task.labels)
        try:
            names = collect_label_names([split.rows[i] for i in split.ids], columns.get(self.label_field,
                                                                                         self.label_field))
        except ValueError as e:
            raise DataError(f"{split.source}: {e}") from None
        return self.order_labels(names)

    def order_labels(self, names: List[str]) -> List[str]:
        """The label names found in the data (sorted), in id order."""
        return names

    def make_encoders(self):
        """(train encoder, eval encoder): row -> Encoded features; sets self.encoder."""
        raise NotImplementedError

    # ----------------------------------------------------------- model
    def load_model(self, precision, quantization_config):
        import transformers

        from fttrain.config.schema import value_of
        from fttrain.models.load import DTYPES

        kwargs = {"quantization_config": quantization_config} if quantization_config is not None else {}
        if self.label_names is not None:  # num_labels, id2label, label2id, problem_type
            kwargs.update(model_label_config(self.label_names, multi_label=self.multi_label))
        model = getattr(transformers, self.auto_model).from_pretrained(
            self.model_path, dtype=DTYPES[precision], revision=self.cfg.model.revision,
            trust_remote_code=self.cfg.model.trust_remote_code,
            attn_implementation=str(value_of(self.cfg.model.attn_implementation)), **kwargs)
        if model.config.pad_token_id is None:  # decoder backbones read the class at the last non-pad token
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def padding(self):
        """The collator that pads a batch's features (and, per token, their labels)."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    def loss_func(self):
        """The Trainer's compute_loss_func; None: the head's own loss."""
        return None

    def build_trainer(self):
        from fttrain.trainer import AtTrainBegin

        self.collator = FeatureCollator(self.padding())
        trainer = EncoderTrainer(
            model=self.model,
            args=self.args,
            train_dataset=self.train_features,
            eval_dataset=self.eval_features,
            data_collator=self.collator,
            processing_class=self.tokenizer,
            compute_loss_func=self.loss_func(),
            callbacks=self.callbacks(AtTrainBegin(self._metrics_before)),
            task_eval=self.evaluate_task,
            param_groups=self.hooks.param_groups,
        )
        trainer.setup_accounting(self.cfg.trainer.rank_records)
        trainer.virtual_tokens = virtual_token_count(self.model) if self.shifts_targets else 0
        return trainer

    # ------------------------------------------------------------ train
    def _metrics_before(self):
        # At train begin (see AtTrainBegin): on a resumed run, the resumed weights.
        if self.eval_features is not None:
            self.before = self.evaluate_task()
            if self.is_main:
                log.info("eval before training: %s", {k: round(self.before[k], 4) for k in self.summary_metrics})

    @torch.no_grad()
    def evaluate_task(self) -> Dict[str, float]:
        """Eval loss and the task's metrics over every eval row exactly once;
        keeps the per-row predictions in self.predictions."""
        trainer, features = self.trainer, self.eval_features
        model = trainer.model
        was_training = model.training
        model.eval()
        bs = self.args.per_device_eval_batch_size
        loss_sum, loss_weight, raw = 0.0, 0, []
        for start in range(0, len(features), bs):
            batch = trainer._prepare_inputs(self.collator(features[start:start + bs]))
            with trainer.compute_loss_context_manager():
                loss, out = trainer.compute_loss(model, batch, return_outputs=True)
            weight = self.loss_weight(batch)
            loss_sum, loss_weight = loss_sum + float(loss) * weight, loss_weight + weight
            raw += self.per_feature(out, batch["input_ids"].shape[1])
        if was_training:
            model.train()
        metrics, self.predictions = self.score(raw)
        return {"loss": loss_sum / max(loss_weight, 1), **metrics}

    def loss_weight(self, batch) -> int:
        """What the head's loss is a mean over: rows."""
        return batch["input_ids"].shape[0]

    def per_feature(self, out, length: int) -> List:
        """One numpy result per feature from the model's outputs for a batch
        padded to length. Virtual-token methods put their tokens before the
        input; only the input's positions are kept."""
        raise NotImplementedError

    def score(self, raw: List):
        """(metrics, per-row predictions) from every eval feature's result."""
        raise NotImplementedError

    # ------------------------------------------------------------- save
    def save_extra_files(self, folder) -> None:
        """labels.json: the label names in id order (also in config.json's
        id2label when the whole model is saved; an adapter folder has no
        config.json)."""
        if self.label_names is not None:
            atomic.write_json(folder / "labels.json",
                              {"task": self.cfg.task.name, "labels": self.label_names, **self.label_info()})

    def label_info(self) -> dict:
        return {}

    def task_metrics(self) -> dict:
        """eval_<metric> (after training), eval_<metric>_before and _after;
        predictions.jsonl with the first eval rows."""
        after = {k[len("eval_"):]: v for k, v in self.eval_metrics.items() if k.startswith("eval_")}
        if not after:
            return {}
        metrics = {f"eval_{k}": v for k, v in after.items()}
        for when, values in (("before", self.before), ("after", after)):
            for k, v in (values or {}).items():
                metrics[f"eval_{k}_{when}"] = v
        atomic.write_jsonl(self.run_dir / "predictions.jsonl", self.predictions[:PREDICTION_ROWS])
        return metrics

    def log_task_summary(self, metrics: dict) -> None:
        rows = len(self.predictions)
        for key in self.summary_metrics:
            if f"eval_{key}_after" in metrics:
                log.info("held-out %s: %.3f before -> %.3f after training (%d eval rows)", key,
                         metrics.get(f"eval_{key}_before", float("nan")), metrics[f"eval_{key}_after"], rows)


class ClassificationRecipe(EncoderRecipe):
    """One label per row (softmax) or, task.multi_label, any number (a sigmoid
    and a threshold per label); text or text pairs."""

    auto_model = "AutoModelForSequenceClassification"
    shifts_targets = False  # one label per row: nothing to move

    @property
    def label_field(self):
        return "labels" if self.cfg.task.multi_label else "label"

    @property
    def multi_label(self):
        return bool(self.cfg.task.multi_label)

    @property
    def summary_metrics(self):
        return ("macro_f1", "micro_f1") if self.multi_label else ("accuracy", "macro_f1")

    def _label_names(self, split):
        names, task = super()._label_names(split), self.cfg.task
        if set(task.thresholds) - set(names):
            raise ConfigCheckError([f"task.thresholds names labels not in the data's labels {names}: "
                                    f"{sorted(set(task.thresholds) - set(names))}"])
        return names

    def make_encoders(self):
        data = self.cfg.data
        self.encoder = ClassificationEncoder(self.tokenizer, self.label_names, data.max_length, self.multi_label,
                                             data.columns)
        return self.encoder, self.encoder

    def loss_func(self):
        weights = self.cfg.task.class_weights
        if weights is None:
            return None
        return weighted_loss(torch.tensor(list(weights), dtype=torch.float32), self.multi_label)

    def per_feature(self, out, length):
        return list(out.logits.float().cpu().numpy())  # class logits

    def score(self, logits: List[np.ndarray]):
        from fttrain.metrics.classification import multi_label_metrics, single_label_metrics

        names = self.label_names
        logits = np.stack(logits)
        gold = np.asarray([f["labels"] for f in self.eval_features])
        if self.multi_label:
            thresholds = self.thresholds()
            metrics = multi_label_metrics(logits, gold, names, np.asarray(list(thresholds.values())))
            scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
            predicted = [[n for n, s in zip(names, row) if s > thresholds[n]] for row in scores]
        else:
            metrics = single_label_metrics(logits, gold, names)
            scores = np.exp(logits - logits.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            predicted = [names[int(i)] for i in logits.argmax(-1)]
        predictions = [{"row": f["example_id"], **self.eval_rows[f["example_id"]], "predicted": p,
                        "scores": {n: round(float(s), 4) for n, s in zip(names, row)}}
                       for f, p, row in zip(self.eval_features, predicted, scores)]
        return metrics, predictions

    def thresholds(self) -> Dict[str, float]:
        """Each label's decision threshold (multi-label), in id order."""
        task = self.cfg.task
        return {n: float(task.thresholds.get(n, task.threshold)) for n in self.label_names}

    def label_info(self):
        """For multi-label, the decision thresholds too."""
        info = {"multi_label": self.multi_label}
        if self.multi_label:
            info["thresholds"] = self.thresholds()
        return info


class NERRecipe(EncoderRecipe):
    """A tag per word (CoNLL tokens/tags), read at each word's first sub-token."""

    auto_model = "AutoModelForTokenClassification"
    label_field = "tags"
    summary_metrics = ("f1",)

    def order_labels(self, names):
        if "O" in names:  # O is id 0, as in CoNLL label lists
            names = ["O"] + [n for n in names if n != "O"]
        return names

    def make_encoders(self):
        data = self.cfg.data
        self.encoder = NEREncoder(self.tokenizer, self.label_names, data.max_length, self.cfg.task.label_all_tokens,
                                  data.columns)
        return self.encoder, self.encoder

    def padding(self):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(self.tokenizer)  # pads labels with -100

    def loss_weight(self, batch):
        return int((batch["labels"] != IGNORE).sum())  # the head's mean is over labelled tokens

    def per_feature(self, out, length):
        return list(out.logits[:, -length:].argmax(-1).cpu().numpy())  # predicted tag ids per token

    def score(self, token_predictions: List[np.ndarray]):
        from fttrain.metrics.entities import entity_metrics

        gold, predicted, predictions = [], [], []
        for feature, tokens in zip(self.eval_features, token_predictions):
            row = self.eval_rows[feature["example_id"]]
            gold.append(self.encoder.gold_tags(row))
            predicted.append(self.encoder.word_predictions(row, tokens))
            predictions.append({"row": feature["example_id"], **row, "predicted": predicted[-1]})
        return entity_metrics(gold, predicted), predictions


class QARecipe(EncoderRecipe):
    """Extractive answers (SQuAD): one feature per context window; the best
    span over a row's windows."""

    auto_model = "AutoModelForQuestionAnswering"
    summary_metrics = ("exact_match", "f1")
    batch_unit = "context windows"

    def truncated_what(self):
        return "answers in no window (raise task.doc_stride)"

    def make_encoders(self):
        task, data = self.cfg.task, self.cfg.data
        self.encoder = QAEncoder(self.tokenizer, data.max_length, task.doc_stride, task.version_2_with_negative,
                                 data.columns)
        return self.encoder.train_features, self._eval_features

    def _eval_features(self, row) -> Encoded:
        """Eval windows (offsets for the answer text) with the answer's token
        positions of the same windows, so the eval loss is the training loss."""
        windows, targets = self.encoder.eval_features(row), self.encoder.train_features(row)
        for feature, target in zip(windows.features, targets.features):
            feature["start_positions"], feature["end_positions"] = target["start_positions"], target["end_positions"]
        return Encoded(windows.features, targets.truncated)

    def setup_model(self) -> None:
        super().setup_model()
        keep_token_type_ids(self.model)

    def per_feature(self, out, length):
        starts, ends = (x[:, -length:].float().cpu().numpy() for x in (out.start_logits, out.end_logits))
        return list(zip(starts, ends))

    def score(self, logits: List):
        from fttrain.metrics.squad import postprocess_qa, squad_metrics

        task = self.cfg.task
        width = max(len(s) for s, _ in logits)
        starts = np.full((len(logits), width), -1e4, dtype=np.float32)  # batches pad to different lengths
        ends = starts.copy()
        for i, (s, e) in enumerate(logits):
            starts[i, :len(s)], ends[i, :len(e)] = s, e
        ids = list(dict.fromkeys(f["example_id"] for f in self.eval_features))  # rows in order, once each
        rows = {i: self.eval_rows[i] for i in ids}
        contexts = {i: self.encoder.columns.text(row, "context") for i, row in rows.items()}
        answers = postprocess_qa(contexts, self.eval_features, starts, ends, n_best=task.n_best,
                                 max_answer_length=task.max_answer_length,
                                 version_2_with_negative=task.version_2_with_negative,
                                 null_score_diff_threshold=task.null_score_diff_threshold)
        references = {i: [text for text, _ in self.encoder.answers(row)] for i, row in rows.items()}
        predictions = [{"row": i, **rows[i], "predicted": answers[i]} for i in ids]
        return squad_metrics(answers, references), predictions
