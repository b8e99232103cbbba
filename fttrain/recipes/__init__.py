"""One recipe per task family; ``task.name`` picks it (``fttrain.tasks``: each task's
recipe; see each file's docstring)."""


def recipe_class(task: str):
    import importlib

    from fttrain.tasks import task_of

    module, cls = task_of(task).recipe.split(":")
    return getattr(importlib.import_module(f"fttrain.recipes.{module}"), cls)
