"""One recipe per task family; ``task.name`` picks it (see each file's docstring)."""

RECIPES = {
    "sft": "sft", "pt": "sft",  # causal LM on formatted, masked, packed tokens
    "dpo": "preference", "kto": "preference", "orpo": "preference",  # TRL preference trainers
    "rm": "reward",  # scalar-head reward model on pairs
    "grpo": "grpo",  # RL from reward functions
    "cls": "encoder", "ner": "encoder", "qa": "encoder",  # encoder heads
}


def run_task(cfg, run_dir):
    import importlib

    name = cfg.task.name
    if name not in RECIPES:
        raise ValueError(f"task.name={name!r} has no recipe; known: {sorted(RECIPES)}")
    return importlib.import_module(f"fttrain.recipes.{RECIPES[name]}").run(cfg, run_dir)
