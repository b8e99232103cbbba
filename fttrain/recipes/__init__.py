"""One recipe per task family; ``task.name`` picks it (see each file's docstring)."""

RECIPES = {
    "sft": "sft:SFTRecipe", "pt": "sft:SFTRecipe",  # causal LM on formatted, masked, packed tokens
    "dpo": "preference:PreferenceRecipe", "kto": "preference:PreferenceRecipe",  # TRL preference trainers
    "orpo": "preference:PreferenceRecipe",
    "rm": "reward:RewardRecipe",  # scalar-head reward model on pairs
    "grpo": "grpo:GRPORecipe",  # RL from reward functions
    "cls": "encoder:EncoderRecipe", "ner": "encoder:EncoderRecipe", "qa": "encoder:EncoderRecipe",  # encoder heads
}


def recipe_class(task: str):
    import importlib

    if task not in RECIPES:
        raise ValueError(f"task.name={task!r} has no recipe; known: {sorted(RECIPES)}")
    module, cls = RECIPES[task].split(":")
    return getattr(importlib.import_module(f"fttrain.recipes.{module}"), cls)


def run_task(cfg, run_dir):
    from fttrain.recipes.base import run_recipe

    return run_recipe(recipe_class(cfg.task.name)(cfg, run_dir))
