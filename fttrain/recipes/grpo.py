"""Group relative policy optimisation (task ``grpo``) with TRL's GRPOTrainer,
plain ``generate`` (no vLLM); shared steps in ``base.py``:

    data       prompt rows (string or chat) + the columns the reward functions read
               (``data/preference.py`` PromptRows checks every row has them)
    rewards    task.rewards: functions named by _target_ with their arguments
               and weights (``fttrain/rewards.py``); imported at config check
    model      AutoModelForCausalLM + PEFT; with task.beta > 0 a reference
               (the adapter switched off, or a frozen copy)
    train      per step: num_generations completions per prompt are sampled,
               scored, and advantages are rewards relative to their group;
               TRL logs reward and reward_std (the spread) per step
    save       model/; metrics.json: greedy mean reward on held-out prompts
               before and after training, per function and weighted

``trainer.micro_batch_size`` counts completions, so a step holds
global batch / num_generations prompts (checked to divide evenly).
"""

from __future__ import annotations

import logging

import torch

from fttrain.data.preference import PromptRows, reward_columns
from fttrain.data.rows import convert_rows, load_splits
from fttrain.models.load import load_model
from fttrain.recipes.base import Recipe
from fttrain.rewards import build_rewards, completion_text

log = logging.getLogger("fttrain")


class GRPORecipe(Recipe):
    batch_unit = "completions"
    before = after = None  # greedy reward on held-out prompts

    def setup_data(self) -> None:
        data, task = self.cfg.data, self.cfg.task
        self.reward_funcs, self.reward_weights = build_rewards(task.rewards)
        rows = PromptRows(data.columns, data.role_map, reward_columns(self.reward_funcs))
        train_split, eval_split = load_splits(data)
        self.train_rows, _, report = convert_rows(train_split, rows, data.strict)
        self.data_report = {"train": report, "reward_columns": reward_columns(self.reward_funcs)}
        self.eval_rows = None
        if eval_split is not None:
            self.eval_rows, _, report = convert_rows(eval_split, rows, data.strict)
            self.data_report["eval"] = report

    def load_model(self, precision, quantization_config):
        return load_model(self.cfg.model, self.model_path, precision, quantization_config=quantization_config)

    def training_args_class(self):
        from trl import GRPOConfig

        return GRPOConfig

    def task_training_args(self) -> dict:
        t = self.cfg.task
        if self.global_batch_size_completions() % t.num_generations:
            from fttrain.config.checks import ConfigCheckError

            raise ConfigCheckError([
                f"a step's {self.global_batch_size_completions()} completions (trainer.micro_batch_size x accumulation "
                f"x ranks) do not split into groups of task.num_generations={t.num_generations}"])
        return {
            "num_generations": t.num_generations,
            "max_completion_length": t.max_completion_length,
            "beta": t.beta,
            "temperature": t.temperature,
            "loss_type": t.loss_type,
            "scale_rewards": t.scale_rewards,
            "reward_weights": build_rewards(t.rewards)[1],
            "disable_dropout": True,
            "use_vllm": False,
        }

    def global_batch_size_completions(self) -> int:
        return self.cfg.trainer.micro_batch_size * self.accum * self.topology.world_size

    def build_trainer(self):
        from datasets import Dataset
        from trl import GRPOTrainer

        from fttrain.trainer import AtTrainBegin

        return self.trl_trainer(
            GRPOTrainer,
            ("prompt_mask", "completion_mask"),  # together they cover each sequence once
            reward_funcs=self.reward_funcs,
            train_dataset=Dataset.from_list(self.train_rows),
            callbacks=self.callbacks(AtTrainBegin(self._reward_before)),
        )

    # ------------------------------------------------------------ train
    def has_eval(self) -> bool:
        return False  # GRPO has no eval loss; held-out prompts are scored by generation below

    def _reward_before(self):
        self.before = self.held_out_reward("before")

    def after_training(self) -> None:
        self.after = self.held_out_reward("after")

    @torch.no_grad()
    def held_out_reward(self, when: str):
        """Greedy completions for up to task.eval_samples held-out prompts,
        scored by every reward function; all ranks generate in step."""
        if not self.eval_rows or self.cfg.task.eval_samples <= 0:
            return None
        rows = self.eval_rows[: self.cfg.task.eval_samples]
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        was_training = model.training
        model.eval()
        tok = self.tokenizer
        completions = []
        for row in rows:
            prompt = row["prompt"]
            if isinstance(prompt, list):
                ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            else:
                ids = tok(prompt)["input_ids"]
            ids = torch.tensor([ids], device=self.args.device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=self.cfg.task.max_completion_length, pad_token_id=tok.pad_token_id,
                                 synced_gpus=self.args.world_size > 1)
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            completions.append([{"role": "assistant", "content": text}] if isinstance(prompt, list) else text)
        if was_training:
            model.train()
        columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}
        prompts = [r["prompt"] for r in rows]
        per_func = {}
        total = [0.0] * len(rows)
        for f, w in zip(self.reward_funcs, self.reward_weights):
            scores = [0.0 if s is None else float(s) for s in f(prompts=prompts, completions=completions, **columns)]
            per_func[f.__name__] = sum(scores) / len(scores)
            total = [t + w * s for t, s in zip(total, scores)]
        result = {"reward": sum(total) / len(total), "per_function": per_func, "prompts": len(rows),
                  "samples": [{"prompt": p, "completion": completion_text(c)} for p, c in zip(prompts[:4], completions[:4])]}
        if self.is_main:
            log.info("held-out greedy reward %s training: %.3f %s", when, result["reward"], per_func)
        return result

    # ------------------------------------------------------------- save
    def task_metrics(self) -> dict:
        history = [r for r in self.trainer.state.log_history if "reward" in r]
        metrics = {}
        if history:
            metrics["train_reward_first"] = history[0]["reward"]
            metrics["train_reward_last"] = history[-1]["reward"]
            metrics["train_reward_std_last"] = history[-1].get("reward_std")
        for when, res in (("before", self.before), ("after", self.after)):
            if res:
                metrics[f"eval_reward_{when}"] = res["reward"]
                for name, v in res["per_function"].items():
                    metrics[f"eval_rewards/{name}_{when}"] = v
        return metrics

    def log_task_summary(self, metrics: dict) -> None:
        if self.after:
            log.info("held-out greedy reward: %.3f before -> %.3f after training",
                     metrics.get("eval_reward_before", float("nan")), self.after["reward"])

