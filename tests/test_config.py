"""Every experiment composes and validates; bad configs fail at compose time,
naming the key, before any model or data loads."""

import time

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONF, compose, compose_error, config_error, run_cli
from fttrain.config.checks import ConfigCheckError, check_config

EXPERIMENTS = sorted(p.stem for p in (CONF / "exp").glob("*.yaml"))


def test_experiments_are_found():
    assert {"demo", "demo_pretrain", "llama8b_qlora", "tiny_sft"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes_and_validates(exp):
    cfg = compose([f"+exp={exp}"])
    check_config(cfg)
    # Everything resolves (no missing mandatory values, no broken interpolations).
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert cfg.name == exp


def test_every_yaml_starts_with_its_command():
    for path in CONF.rglob("*.yaml"):
        lines = path.read_text().splitlines()
        head = lines[1] if lines[0].startswith("# @package") else lines[0]
        assert head.startswith("# ") and ("fttrain" in head or "accelerate" in head), path


def test_experiments_start_with_global_package():
    for path in (CONF / "exp").glob("*.yaml"):
        assert path.read_text().startswith("# @package _global_"), path


def test_llama8b_qlora_is_a_real_qlora_experiment():
    cfg = compose(["+exp=llama8b_qlora"])
    assert cfg.model.name_or_path == "meta-llama/Llama-3.1-8B"
    assert cfg.peft.method == "qlora" and cfg.peft.bits == 4 and cfg.peft.quant_type == "nf4"
    assert cfg.precision.dtype.value == "bf16"
    assert cfg.data.chat_template == "llama3"


def test_default_run_dir_is_derived_from_name_not_time():
    cfg = compose(["+exp=tiny_sft"], return_hydra_config=True)
    assert cfg.hydra.run.dir == "outputs/tiny_sft"
    cfg = compose(["+exp=tiny_sft", "output_root=/scratch/me"], return_hydra_config=True)
    assert cfg.hydra.run.dir == "/scratch/me/tiny_sft"


@pytest.mark.parametrize(
    "override, key",
    [
        ("peft.rr=8", "peft.rr"),  # misspelled key
        ("+trainer.lerning_rate=1e-4", "trainer.lerning_rate"),  # unknown key, even with +
        ("trainer.max_steps=ten", "trainer.max_steps"),  # wrong type
        ("data.overlength=chop", "data.overlength"),  # not one of the choices
        ("data.format=jsonl", "data.format"),
        ("data.packing=maybe", "data.packing"),
        ("model.attn_implementation=flash3", "model.attn_implementation"),
    ],
)
def test_bad_overrides_fail_with_key_path(override, key):
    # Hydra refuses what the schema types say; the cross-field checks the rest.
    with pytest.raises((ConfigCompositionException, ConfigCheckError)) as err:
        check_config(compose(["+exp=tiny_sft", override]))
    assert f"full_key: {key}" in str(err.value) or key in str(err.value)


def test_typo_inside_an_experiment_file_fails_with_key_path(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "typo.yaml").write_text(
        "# @package _global_\n# python -m fttrain +exp=typo\nname: typo\ndata:\n  max_lenght: 64\n"
    )
    with pytest.raises(ConfigCompositionException) as err:
        compose([f"hydra.searchpath=[file://{tmp_path}]", "+exp=typo"])
    assert "data.max_lenght" in str(err.value)


def test_wrong_type_inside_an_experiment_file(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "bad.yaml").write_text("# @package _global_\nname: bad\npeft:\n  r: sixteen\n")
    with pytest.raises(ConfigCompositionException) as err:
        compose([f"hydra.searchpath=[file://{tmp_path}]", "+exp=bad"])
    assert "peft.r" in str(err.value)


def test_keys_of_another_peft_method_are_rejected():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["+exp=tiny_sft", "peft=full", "peft.r=8"])
    assert "peft.r" in str(err.value)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["task=pt"], "task=pt reads data.format text"),
        (["data.format=text"], "task.assistant_only_loss"),
        (["trainer.global_batch_size=7"], "trainer.global_batch_size=7"),
        (["data.eval=null", "data.eval_fraction=0", "trainer.eval_steps=2"], "trainer.eval_steps"),
        (["data.chat_template=vicuna"], "data.chat_template='vicuna'"),
        (["data.eval_fraction=1.5"], "data.eval_fraction"),
        (["resume_from=auto", "overwrite=true"], "resume_from"),
        (["model.attn_implementation=flash_attention_2"], "flash-attn"),
        (["data.chat_template=/no/such/template.jinja"], "no such file"),
        (["+data.role_map.bot=robot"], "data.role_map.bot='robot'"),
        (["task.train_roles=[assistant,robot]"], "task.train_roles"),
    ],
)
def test_cross_field_checks(overrides, needle):
    assert needle in config_error(["+exp=tiny_sft"] + overrides)


@pytest.mark.parametrize("base, override, allowed", [
    ("tiny_sft", "data.overlength=chop", "[truncate, drop, raise]"),
    ("tiny_sft", "task.history_rewrite=sometimes", "[split, last, raise]"),
    ("tiny_full", "dist=zero3 dist.save_format=gathered", "[full, sharded]"),
    ("tiny_full", "dist=fsdp dist.activation_checkpointing=torch", "[model, fsdp]"),
    ("tiny_sft", "peft.init=svd", "[default, gaussian, pissa, loftq]"),
    ("tiny_sft", "peft.bias=some", "[none, all, lora_only]"),
    ("tiny_sft", "peft=qlora peft.compute_dtype=float64", "[auto, bfloat16, float16, float32]"),
    ("tiny_sft", "peft=qlora peft.quant_type=int4", "[nf4, fp4]"),
    ("tiny_sft", "peft=qlora peft.quant_storage=int8", "[bfloat16, float16, float32, uint8]"),
    ("tiny_sft", "peft=adapter peft.activation=swish", "[gelu, relu, silu, tanh]"),
    ("tiny_sft", "peft=adapter peft.placement=beside", "[serial, parallel]"),
    ("tiny_full", "peft=galore peft.optimizer=sgd", "[adamw, adamw_8bit, adafactor]"),
    ("tiny_full", "peft=galore peft.proj_type=diag", "[std, reverse_std, right, left, full]"),
    ("tiny_sft", "peft=p_tuning peft.encoder_type=GRU", "[MLP, LSTM]"),
    ("tiny_dpo", "task.loss_type=[sigmoid,nope]", "sigmoid, hinge, ipo"),
    ("tiny_dpo", "task=kto task.loss_type=sigmoid", "[kto, apo_zero_unpaired]"),
    ("tiny_sft", "precision.dtype=fp64", "[auto, bf16, fp16, fp32]"),
])
def test_a_value_outside_a_closed_set_fails_at_compose_with_the_choices(base, override, allowed):
    # The schema types every closed set (fttrain.config.choice): the key, the
    # bad value and every allowed one, before any check or model.
    overrides = override.split()
    key, value = overrides[-1].split("=")
    message = compose_error([f"+exp={base}", *overrides])
    assert f"full_key: {key}" in message, message
    bad = value.strip("[]").split(",")[-1]
    assert f"Invalid value '{bad}', expected one of" in message and allowed in message, message


def test_kto_reads_pairs_or_unpaired_rows():
    assert "task=kto reads data.format preference or unpaired" in config_error(
        ["+exp=tiny_dpo", "task=kto", "data.format=messages"])


def test_cli_rejects_a_typo_before_loading_anything(tmp_path):
    start = time.time()
    proc = run_cli(["+exp=tiny_sft", "peft.rr=8"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "peft.rr" in proc.stderr + proc.stdout
    assert not (tmp_path / "outputs" / "tiny_sft" / "config.yaml").exists()
    assert time.time() - start < 60


@pytest.mark.slow
def test_cli_reports_cross_field_problem_without_training(tmp_path):
    proc = run_cli(["+exp=tiny_sft", "task=pt"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "task=pt reads data.format text" in proc.stderr + proc.stdout
    assert not (tmp_path / "outputs" / "tiny_sft" / "model").exists()


def test_option_files_set_only_what_differs_from_the_schema():
    """One source of truth: a knob's default and its comment live in its config class;
    an option file sets only the knobs it changes (required ones, ???, excepted)."""
    import dataclasses
    from enum import Enum

    import yaml

    from fttrain.config.schema import GROUP_SCHEMAS

    restated = []
    for group, options in GROUP_SCHEMAS.items():
        for path in sorted((CONF / group).glob("*.yaml")) if (CONF / group).is_dir() else []:
            raw = yaml.safe_load(path.read_text()) or {}
            schema = [d.split("/")[3].split("@")[0] for d in raw.pop("defaults", [])
                      if isinstance(d, str) and d.startswith("/schema/")]
            if not schema:
                continue  # built on another option: its values are that option's differences
            for f in dataclasses.fields(options[schema[0]]):
                if f.name not in raw or f.default == "???":
                    continue
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                default = default.value if isinstance(default, Enum) else default
                if raw[f.name] == default:
                    restated.append(f"{group}/{path.name}: {f.name}")
    assert restated == []
