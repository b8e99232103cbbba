"""FourierFT (Gao et al. 2024): the update of each adapted weight matrix is the
inverse 2-D DFT of ``n_frequency`` learned coefficients at fixed random
frequencies, so an adapted matrix trains n coefficients instead of LoRA's
r x (in + out). Through peft's FourierFTConfig; merges like LoRA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from fttrain.methods.base import Method, PeftConfig, apply_peft_library
from fttrain.methods.targets import targets
from fttrain.config.bounds import bounded


@dataclass
class FourierFTConfig(PeftConfig):
    method: str = "fourierft"
    n_frequency: int = bounded(1000, lo=1)  # learned coefficients per adapted matrix (at most in x out of the smallest)
    # scale of the update, like LoRA's alpha: tune it with the learning rate
    scaling: float = bounded(150.0, lo=0, lo_open=True)
    random_loc_seed: int = bounded(777, lo=0)  # which frequencies; saved with the adapter
    # or [all_linear], [query_value], or module names
    target_modules: List[str] = field(default_factory=lambda: ["attention"])


def fourierft_config(model, c, ctx):
    import peft

    return peft.FourierFTConfig(n_frequency=c.n_frequency, scaling=c.scaling, random_loc_seed=c.random_loc_seed,
                                target_modules=targets(model, c), task_type=ctx.task_type)


def fourierft_problems(cfg) -> List[str]:
    if cfg.peft.n_frequency <= 0:
        return [f"peft.n_frequency={cfg.peft.n_frequency} must be positive"]
    return []


METHODS = (
    # Verified with dist=single and ddp only so far.
    Method("fourierft", FourierFTConfig, apply_peft_library(fourierft_config), check=fourierft_problems,
           sharded_ok=False),
)
