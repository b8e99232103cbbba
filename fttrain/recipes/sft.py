"""Causal-LM fine-tuning (tasks ``sft`` and ``pt``); the shared steps are in ``base.py``:

    data       format -> tokenize with the loss mask -> pack (sft: best-fit rows;
               pt: documents concatenated into max_length blocks)
    model      AutoModelForCausalLM + PEFT -> FTTrainer (token-normalised loss)
    train      generations before, train, eval loss (pt: perplexity), generations after
    save       model/, metrics.json with exact match / perplexity, samples.jsonl
"""

from __future__ import annotations

import logging
import time

from fttrain import atomic
from fttrain.config.checks import packing_on
from fttrain.config.schema import flattens_packed_rows
from fttrain.data.packing import PackedCollator, PaddingCollator
from fttrain.data.pipeline import MAX_PATTERN_SAMPLES, mask_policy, prepare_data_cached, streams
from fttrain.data.streaming import open_stream
from fttrain.data.tokenize import IGNORE
from fttrain.plan import shards_weights
from fttrain.env import rss_bytes
from fttrain.generation_eval import exact_match, generate_answers
from fttrain.models.load import load_model
from fttrain.paths import cache_dir
from fttrain.recipes.base import Recipe

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


def prepared_data(cfg, tokenizer, chat_template, fresh_tag=None):
    """The run's prepared rows, from the cache when an identical preparation is there.
    ``fttrain compare`` rebuilds a finished run's eval split with it, so every model is
    scored on the rows and loss mask the run evaluated on."""
    assistant_only = bool(getattr(cfg.task, "assistant_only_loss", False))
    return prepare_data_cached(cfg.data, tokenizer, chat_template, assistant_only, cache_dir(),
                               blocks=bool(getattr(cfg.task, "concatenate", False)), policy=mask_policy(cfg.task),
                               fresh_tag=fresh_tag)


class SFTRecipe(Recipe):
    """Tasks ``sft`` (chats, instructions, prompt/completion) and ``pt`` (raw text)."""

    @property
    def concatenates(self) -> bool:
        """Documents concatenated into max_length blocks (task=pt's knob; sft has none)."""
        return bool(getattr(self.cfg.task, "concatenate", False))

    @property
    def batch_unit(self):
        if self.concatenates:
            return f"{self.cfg.data.max_length}-token blocks"
        return "packed rows" if packing_on(self.cfg) else "samples"

    # ------------------------------------------------------------ data
    def setup_data(self) -> None:
        cfg = self.cfg
        assistant_only = bool(getattr(cfg.task, "assistant_only_loss", False))
        blocks = self.concatenates
        rss, start = rss_bytes(), time.perf_counter()
        # Prepared once per node into the cache (with streaming: the eval split only).
        self.data = prepared_data(cfg, self.tokenizer, self.chat_template, fresh_tag=self.launch_token)
        self.data_report = self.data.report
        if streams(cfg.data):
            self.stream = open_stream(cfg.data, self.tokenizer, self.chat_template, assistant_only, blocks=blocks,
                                      policy=mask_policy(cfg.task))
            self.data_report["train"] = self.stream.report()
            log.info("data: streaming %d training rows from %s, %d rows a window", len(self.stream.ids),
                     cfg.data.train, self.stream.window)
        else:
            # Each rank maps the prepared files: its memory grows by the pages it reads, not by the data set.
            log.info("data: %d training rows (%d tokens) ready from %s in %.2f s; RSS %+.1f MiB on this rank",
                     len(self.data.train.rows), self.data.train.rows.num_tokens, self.data.folder,
                     time.perf_counter() - start, (rss_bytes() - rss) / 2**20)
        if self.is_main:
            self._log_marked_samples(every_pattern=cfg.preflight)

    def _log_marked_samples(self, every_pattern: bool) -> None:
        """A training sample with its trained tokens in [[...]]: one per distinct
        role pattern in preflight (system,user,assistant / ...,tool,assistant, ...), else the first."""
        if self.stream is not None:
            first = self.stream.first_sample()
            samples = {"": first} if first else {}
        else:
            samples = self.data.train.pattern_samples or {"": self._first_sample()}
        shown = list(samples.items()) if every_pattern else list(samples.items())[:1]
        for pattern, sample in shown:
            log.info("sample%s with trained tokens in [[...]]:\n%s", f" ({pattern})" if pattern else "",
                     render_marked_sample(self.tokenizer, sample))
        if every_pattern and len(samples) > 1:
            log.info("%d distinct role patterns shown (at most %d, the first row of each)", len(samples),
                     MAX_PATTERN_SAMPLES)

    def _first_sample(self):
        """The first sample of the first training row (text data: no role patterns)."""
        row = self.data.train.rows[0]
        if "position_ids" not in row:
            return row
        end = row["position_ids"][1:].index(0) + 1 if 0 in row["position_ids"][1:] else len(row["input_ids"])
        return {"input_ids": row["input_ids"][:end], "labels": row["labels"][:end]}

    # ---------------------------------------------------------- stream
    stream = None  # a RowStream with data.streaming=true

    def task_training_args(self) -> dict:
        if not streams(self.cfg.data):
            return {}
        # Every rank reads the whole stream and keeps its share of each global batch
        # (accelerate's IterableDatasetShard); a resume starts the stream where the
        # checkpoint left it (before_resume), so the Trainer must not skip batches again.
        return {"accelerator_config": {"dispatch_batches": False}, "ignore_data_skip": True}

    def before_resume(self, checkpoint, step: int) -> None:
        if self.stream is None:
            return
        from fttrain.data.sources import DataError
        from fttrain.data.streaming import STATE_FILE, load_state

        state = load_state(checkpoint)
        if state is None:
            raise DataError(f"{checkpoint} has no {STATE_FILE}: it was not written by a streaming run, so the "
                            "stream's position is unknown. Resume with data.streaming=false, or start a new run.")
        if state.get("consumed", -1) >= 0:  # the furthest row any rank trained on
            pass_index, window, offset = self.stream.resume_after(state)
            log.info("stream resumes after stream position %d: pass %d, window %d, row %d in it",
                     state["consumed"], pass_index, window, offset)
            return
        # A checkpoint from before positions were recorded: steps x rows a step (exact in the first pass).
        consumed = step * self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps \
            * self.args.world_size
        window, offset = self.stream.resume(state, consumed)
        log.info("stream resumes after %d rows (%d steps x %d rows a step): window %d, row %d in it", consumed, step,
                 consumed // max(1, step), window, offset)

    # ----------------------------------------------------------- model
    def load_model(self, precision, quantization_config):
        if self.cfg.trainer.gradient_checkpointing:
            log.info("gradient checkpointing on: use_cache turned off")
        return load_model(self.cfg.model, self.model_path, precision, quantization_config=quantization_config)

    def build_trainer(self):
        from fttrain.trainer import AtTrainBegin

        trainer_cls, task_kwargs = self.trainer_setup()
        train_rows, eval_rows = self.training_rows()
        trainer = trainer_cls(
            model=self.model,
            args=self.args,
            train_dataset=train_rows,
            eval_dataset=eval_rows,
            data_collator=self.make_collator(),
            processing_class=self.tokenizer,
            callbacks=self.callbacks(AtTrainBegin(self._generations_before)),
            rank_records=self.cfg.trainer.rank_records,
            param_groups=self.hooks.param_groups,
            **task_kwargs,
        )
        if self.stream is not None:
            trainer.tracks_stream = True
            trainer.checkpoint_extras = (lambda folder: self.stream.save_state(folder, trainer.stream_consumed),)
        return trainer

    def trainer_setup(self):
        """(trainer class, its task keywords): distillation adds its teacher."""
        from fttrain.trainer import FTTrainer

        return FTTrainer, {}

    def training_rows(self):
        """(train, eval) datasets the trainer reads."""
        return (self.stream if self.stream is not None else self.data.train.rows,
                self.data.eval.rows if self.data.eval else None)

    def make_collator(self):
        pad = self.tokenizer.pad_token_id
        if self.batch_unit == "packed rows":
            return PackedCollator(pad, flatten=flattens_packed_rows(self.cfg.model.attn_implementation))
        return PaddingCollator(pad)

    # ------------------------------------------------------------ train
    before = after = None  # generation results, set during train()

    def _generations_before(self):
        # At train begin (see AtTrainBegin): on a resumed run, the resumed weights.
        self.before = self._generations("before")

    def _generations(self, when: str):
        if shards_weights(self.cfg.dist):
            # Every forward pass gathers weights from all ranks, so all ranks
            # generate the same prompts in step (synced_gpus); rank 0 keeps them.
            result = self._generation_eval(when, synced=True)
            return result if self.is_main else None
        return self.on_main(f"generation {when} training", lambda: self._generation_eval(when))

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

    def after_training(self) -> None:
        self.after = self._generations("after")

    # ------------------------------------------------------------- save
    def task_metrics(self) -> dict:
        metrics = {}
        if self.stream is not None:  # the stream's counts, now that it has been read
            self.data_report["train"] = self.stream.report()
            atomic.write_json(self.run_dir / "data_report.json", self.data_report)
        if "eval_perplexity" in self.eval_metrics:  # exp of the token-weighted eval loss
            metrics["eval_perplexity"] = self.eval_metrics["eval_perplexity"]
        for when, res in (("before", self.before), ("after", self.after)):
            if res and res["exact_match"] is not None:
                metrics[f"eval_exact_match_{when}"] = res["exact_match"]
        if self.after:
            n = max(1, self.cfg.task.generation_eval.num_samples)
            atomic.write_jsonl(self.run_dir / "samples.jsonl", self.after["results"][:n])
        return metrics

    def log_task_summary(self, metrics: dict) -> None:
        if "eval_exact_match_after" in metrics:
            log.info(
                "held-out exact match: %.3f before -> %.3f after training",
                metrics.get("eval_exact_match_before", float("nan")), metrics["eval_exact_match_after"],
            )
        if "eval_perplexity" in metrics:
            log.info("held-out perplexity: %.3f", metrics["eval_perplexity"])

