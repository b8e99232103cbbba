"""One recipe per task family; ``task.name`` picks it."""


def run_task(cfg, run_dir):
    name = cfg.task.name
    if name in ("sft", "pt"):
        from fttrain.recipes.sft import run

        return run(cfg, run_dir)
    raise ValueError(f"task.name={name!r} has no recipe")
