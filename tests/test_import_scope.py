"""A single run keeps DeepSpeed, bitsandbytes and torchao out of its process
when its config does not use them (fttrain/import_scope.py), and keeps them
whenever it might."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, compose
from fttrain.import_scope import unused_packages

ALL = {"deepspeed", "bitsandbytes", "torchao"}


@pytest.mark.parametrize("overrides, kept", [
    (["+exp=tiny_sft"], set()),
    (["+exp=tiny_full"], set()),
    (["+exp=tiny_sft", "dist=zero2"], {"deepspeed"}),
    (["+exp=tiny_sft", "peft=qlora"], {"bitsandbytes", "torchao"}),
    (["+exp=tiny_sft", "peft.init=loftq"], {"bitsandbytes", "torchao"}),  # LoftQ quantises the base itself
    (["+exp=tiny_sft", "peft=galore"], {"bitsandbytes", "torchao"}),  # its own optimizers may be 8-bit
    (["+exp=tiny_sft", "trainer.optim=adamw_bnb_8bit"], {"bitsandbytes", "torchao"}),
    (["+exp=tiny_sft", "trainer.optim=adamw_torch_8bit"], {"bitsandbytes", "torchao"}),  # torchao's AdamW
    (["+exp=tiny_distill"], {"bitsandbytes", "torchao"}),  # the teacher may be quantised
])
def test_a_run_keeps_out_what_its_config_cannot_use(overrides, kept):
    assert set(unused_packages(compose(overrides))) == ALL - kept


def test_a_launcher_that_asks_for_deepspeed_keeps_it(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert "deepspeed" not in unused_packages(compose(["+exp=tiny_sft"]))


def test_fttrain_import_all_keeps_everything(monkeypatch):
    monkeypatch.setenv("FTTRAIN_IMPORT_ALL", "1")
    assert unused_packages(compose(["+exp=tiny_sft"])) == []


def test_a_quantised_checkpoint_or_one_not_here_keeps_the_quantisation_packages(tmp_path, tiny_dir):
    plain, quantised = tmp_path / "plain", tmp_path / "quantised"
    config = json.loads((tiny_dir / "config.json").read_text())
    for folder, extra in ((plain, {}), (quantised, {"quantization_config": {"quant_method": "bitsandbytes"}})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, **extra}))

    def unused(model):
        return set(unused_packages(compose(["+exp=tiny_sft", f"model.name_or_path={model}"])))

    assert unused(plain) == ALL
    assert unused(quantised) == {"deepspeed"}
    assert unused("some-org/a-model-not-in-the-cache") == {"deepspeed"}  # its config.json is not here


SCRIPT = """
import json, sys
import torch
from fttrain.config.compose import compose_config
from fttrain.import_scope import keep_out_unused

keep_out_unused(compose_config(["+exp=tiny_sft"]))
import peft
from accelerate.utils import extract_model_from_parallel
from transformers import AutoModelForCausalLM, Trainer
extract_model_from_parallel(torch.nn.Linear(1, 1))  # the Trainer's constructor calls it
print(json.dumps(sorted(p for p in %r if sys.modules.get(p) is not None)))
""" % sorted(ALL)


def imported_after_the_trainer_stack(**env) -> set:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_the_trainer_stack_imports_none_of_them_when_kept_out():
    # The same imports load some of them when nothing is kept out, so the test can fail. Which ones
    # depends on the installed releases: DeepSpeed and torchao always so far, bitsandbytes with
    # some (not with peft 0.22, transformers 5.25, accelerate 1.16, bitsandbytes 0.50).
    loaded = imported_after_the_trainer_stack(FTTRAIN_IMPORT_ALL="1")
    assert loaded <= ALL and len(loaded) >= 2, loaded
    assert imported_after_the_trainer_stack(FTTRAIN_IMPORT_ALL="0") == set()
