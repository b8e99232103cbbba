"""fttrain: Hydra-composed, validated fine-tuning of language models."""

import logging as _logging

__version__ = "0.1.0"

# torchao (the quantize extra), imported by peft and transformers whenever it is installed,
# logs at import that its CUDA-only kernels do not load on a CPU machine ("Failed to load
# ..._C_cutlass_90a.so"), and torch that torchao registers enums the old way: every process
# of every run would print them, and neither says anything a user can act on.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
