"""The peft group without training: every option composes, bad values and
bad combinations are refused with the key named, presets resolve per
architecture, bottleneck adapters start as the identity, LISA's draws."""


import pytest
import torch

from conftest import CONF, compose, config_error

PEFT_OPTIONS = sorted(p.stem for p in (CONF / "peft").glob("*.yaml"))


def test_every_option_has_a_schema_and_a_command_line():
    import dataclasses

    from omegaconf import OmegaConf

    from fttrain.methods import METHODS

    assert len(PEFT_OPTIONS) >= 22
    for name in PEFT_OPTIONS:
        first = (CONF / "peft" / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith("# ") and "fttrain" in first, f"{name}.yaml must start with the command that uses it"
        # Typed by its method's declared config class: keys and types are checked while composing.
        peft = compose(["+exp=tiny_sft", f"peft={name}"]).peft
        schema = OmegaConf.get_type(peft)
        assert dataclasses.is_dataclass(schema) and schema is METHODS[peft.method].config, (name, schema)
        assert OmegaConf.is_readonly(peft) is not True and peft._get_flag("struct"), f"{name}: new keys are not refused"


@pytest.mark.parametrize("option", PEFT_OPTIONS)
def test_every_option_composes_on_the_tiny_runs(option):
    from fttrain.config.checks import peft_problems

    base = "+exp=tiny_full" if option in ("full", "freeze", "galore", "lisa") else "+exp=tiny_sft"
    extra = ["data.packing=false"] if option in ("prompt_tuning", "prefix_tuning", "p_tuning") else []
    cfg = compose([base, f"peft={option}", *extra])
    problems = [p for p in peft_problems(cfg) if "pip install" not in p]  # optional packages may be missing
    assert problems == []


@pytest.mark.parametrize("overrides, needle", [
    (["peft=qlora", "peft.method=full"], "4-bit weights cannot be trained directly"),
    (["peft=prompt_tuning"], "set data.packing=false"),
    (["peft=prefix_tuning"], "set data.packing=false"),
    (["peft=adalora", "trainer.max_steps=-1"], "set trainer.max_steps > 0"),
    (["peft=adapter", "peft.sublayers=[attention,mlp]"], "peft.sublayers"),
    (["peft=galore", "trainer.optim=adafactor"], "leave trainer.optim"),
    (["trainer.optim=adamw_tourch"], "trainer.optim='adamw_tourch'"),
    (["peft=freeze", "peft.trainable_layers=0"], "trains nothing"),
    (["peft=lisa", "peft.active_layers=0"], "peft.active_layers"),
])
def test_bad_values_and_combinations_fail_before_any_model_loads(overrides, needle):
    assert needle in config_error(["+exp=tiny_sft", *overrides])


def test_a_knob_of_another_method_fails_at_compose():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose(["+exp=tiny_sft", "peft=ia3", "peft.r=8"])
    assert "peft.r" in str(err.value)


@pytest.mark.parametrize("method, dist, needle", [
    ("lisa", "zero2", "LISA freezes and unfreezes layers"),
    ("lisa", "fsdp", "LISA freezes and unfreezes layers"),
    ("galore", "zero3", "GaLore's optimizer projects whole gradient matrices"),
    ("adapter", "zero3", "peft=adapter with dist=zero3 is not supported yet"),
    ("prompt_tuning", "fsdp", "peft=prompt_tuning with dist=fsdp is not supported yet"),
    ("adalora", "zero2", "AdaLoRA ranks modules by their gradients"),
    ("adalora", "fsdp", "AdaLoRA ranks modules by their gradients"),
    ("dora", "zero3", "peft.use_dora=true with dist=zero3"),
    ("ia3", "zero3", "peft=ia3 with dist=zero3"),
    ("loha", "zero3", "peft=loha with dist=zero3"),
])
def test_methods_a_plan_cannot_carry_are_refused_before_launch(method, dist, needle):
    from fttrain.plan import PlanError, Topology
    from fttrain.plan.check import check_plan

    cfg = compose(["+exp=tiny_sft", f"peft={method}", f"dist={dist}", "data.packing=false"])
    with pytest.raises(PlanError) as err:
        check_plan(cfg, Topology(world_size=2, local_world_size=2), "fp32", on_gpu=False)
    assert needle in str(err.value)


def test_galore_layerwise_is_one_process_only_and_loftq_needs_a_gpu():
    from fttrain.plan import PlanError, Topology
    from fttrain.plan.check import check_plan

    cfg = compose(["+exp=tiny_full", "peft=galore", "peft.layerwise=true", "dist=ddp"])
    with pytest.raises(PlanError, match="runs on one process only"):
        check_plan(cfg, Topology(world_size=2, local_world_size=2), "fp32", on_gpu=False)
    cfg = compose(["+exp=tiny_sft", "peft=loftq", "dist=single"])
    with pytest.raises(PlanError, match="LoftQ initialisation runs on CUDA only"):
        check_plan(cfg, Topology(world_size=1, local_world_size=1), "fp32", on_gpu=False)


def test_qlora_compute_dtype_auto_follows_precision():
    from fttrain.methods import quantization_config

    cfg = compose(["+exp=tiny_sft", "peft=qlora"])
    assert quantization_config(cfg.peft, "fp32").bnb_4bit_compute_dtype == torch.float32
    assert quantization_config(cfg.peft, "bf16").bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(compose(["+exp=tiny_sft", "peft=qlora8"]).peft, "bf16").load_in_8bit


def test_paged_optimizers_run_unpaged_on_cpu_with_a_warning(caplog):
    from fttrain.methods import optimizer_for_device

    with caplog.at_level("WARNING", logger="fttrain"):
        assert optimizer_for_device("paged_adamw_8bit", use_cpu=True) == "adamw_bnb_8bit"
        assert optimizer_for_device("paged_adamw_32bit", use_cpu=True) == "adamw_torch"
        assert optimizer_for_device("paged_lion_8bit", use_cpu=True) == "lion_8bit"
    assert "needs a GPU" in caplog.text
    assert optimizer_for_device("paged_adamw_8bit", use_cpu=False) == "paged_adamw_8bit"


@pytest.mark.parametrize("optim, package", [
    ("adamw_torch", None), ("adamw_torch_fused", None), ("adafactor", None), ("sgd", None), ("rmsprop", None),
    ("adamw_torch_8bit", "torchao"), ("adamw_torch_4bit", "torchao"),
    ("adamw_bnb_8bit", "bitsandbytes"), ("adamw_8bit", "bitsandbytes"), ("paged_adamw_32bit", "bitsandbytes"),
    ("lion_32bit", "bitsandbytes"), ("ademamix", "bitsandbytes"), ("rmsprop_bnb", "bitsandbytes"),
    ("galore_adamw", "bitsandbytes"),  # galore_torch imports bitsandbytes for every optimizer
])
def test_each_optimizer_names_the_package_that_keeps_its_state(optim, package):
    from fttrain.methods import optimizer_package

    assert optimizer_package(optim) == package


def test_an_optimizer_is_refused_only_for_its_own_missing_package(monkeypatch):
    import fttrain.config.checks as checks

    monkeypatch.setattr(checks, "importable", lambda module: module != "bitsandbytes")
    assert config_error(["+exp=tiny_sft", "trainer.optim=adamw_bnb_8bit"]).count("needs bitsandbytes") == 1
    checks.check_config(compose(["+exp=tiny_sft", "trainer.optim=adamw_torch_8bit"]))  # torchao's: not refused
    monkeypatch.setattr(checks, "importable", lambda module: module != "torchao")
    assert "trainer.optim=adamw_torch_8bit needs torchao: pip install 'fttrain[quantize]'" in config_error(
        ["+exp=tiny_sft", "trainer.optim=adamw_torch_8bit"])


# ------------------------------------------------------- model-level units
@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64))


def test_target_presets_resolve_per_architecture(tiny_model):
    from fttrain.methods.targets import resolve_target_modules

    llama = tiny_model()
    assert resolve_target_modules(llama, ["attention"]) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    linear = resolve_target_modules(llama, ["all_linear"])
    assert "lm_head" not in linear and {"q_proj", "down_proj", "gate_proj"} <= set(linear)
    bert = tiny_bert()
    assert resolve_target_modules(bert, ["attention"]) == ["query", "key", "value"]
    assert resolve_target_modules(bert, ["query_value"]) == ["query", "value"]
    assert resolve_target_modules(llama, ["query_value"]) == ["q_proj", "v_proj"]
    assert "classifier" not in resolve_target_modules(bert, ["all_linear"])
    from fttrain.errors import PeftSetupError

    with pytest.raises(PeftSetupError, match="has no module named 'qkv'"):
        resolve_target_modules(llama, ["qkv"])


def test_qlora_on_a_model_without_linear_layers_is_refused():
    from fttrain.methods import PeftSetupError, apply_peft

    class NoLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.conv = torch.nn.Conv2d(1, 1, 3)

    cfg = compose(["+exp=tiny_sft", "peft=qlora"])
    with pytest.raises(PeftSetupError, match="no Linear layers to quantise"):
        apply_peft(NoLinear(), cfg.peft, gradient_checkpointing=False)


@pytest.mark.parametrize("placement", ["serial", "parallel"])
def test_bottleneck_adapter_is_the_identity_at_init_and_learns(tiny_model, placement):
    from fttrain.methods.bottleneck import BottleneckSpec
    from fttrain.methods.bottleneck_layers import add_bottleneck_adapters

    base, model = tiny_model(), tiny_model()
    names = add_bottleneck_adapters(model, BottleneckSpec(r=8, placement=placement, scale=2.0))
    assert len(names) == 2 * model.config.num_hidden_layers
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert torch.equal(base(input_ids=x).logits, model(input_ids=x).logits)  # exactly the base
    for n, p in model.named_parameters():
        p.requires_grad_("bottleneck_adapter" in n)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    with torch.no_grad():
        assert not torch.equal(base(input_ids=x).logits, model(input_ids=x).logits)


def test_bottleneck_adapter_saves_and_reloads_to_identical_outputs(tiny_model, tiny_dir, tmp_path):
    from fttrain.methods.bottleneck import BottleneckSpec
    from fttrain.methods.bottleneck_layers import add_bottleneck_adapters, adapter_state_dict, load_bottleneck, save_bottleneck

    model = tiny_model()
    spec = BottleneckSpec(r=4, base_model_name_or_path=str(tiny_dir))
    add_bottleneck_adapters(model, spec)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "bottleneck_adapter" in n:
                p.normal_(0, 0.1)  # a trained-looking adapter, not the zero init
    weights = adapter_state_dict(model.named_parameters())
    assert weights and all("bottleneck_adapter" in k for k in weights)
    save_bottleneck(weights, spec, tmp_path)
    reloaded = load_bottleneck(tiny_model(), tmp_path)
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, reloaded(input_ids=x).logits)
    # A folder from another base shape is refused with the mismatch named.
    from fttrain.errors import PeftSetupError

    bad = {k: v for k, v in list(weights.items())[1:]}
    save_bottleneck(bad, spec, tmp_path / "bad")
    with pytest.raises(ValueError, match="do not fit this base model"):
        load_bottleneck(tiny_model(), tmp_path / "bad")
    assert issubclass(PeftSetupError, ValueError)


def test_parallel_adapters_are_refused_on_post_norm_encoders():
    from fttrain.methods.bottleneck import BottleneckSpec
    from fttrain.methods.bottleneck_layers import add_bottleneck_adapters
    from fttrain.errors import PeftSetupError

    names = add_bottleneck_adapters(tiny_bert(), BottleneckSpec(r=4))  # serial fits BERT (Houlsby's placement)
    assert any(n.endswith("attention.output.dense.bottleneck_adapter") for n in names)
    with pytest.raises(PeftSetupError, match="post-norm"):
        add_bottleneck_adapters(tiny_bert(), BottleneckSpec(r=4, placement="parallel"))


def test_lisa_draws_are_reproducible_and_change_between_periods():
    from fttrain.methods.lisa import draw_layers

    draws = [draw_layers(42, period, 8, 2) for period in range(6)]
    assert draws == [draw_layers(42, period, 8, 2) for period in range(6)]  # resume redraws the same
    assert len({tuple(d) for d in draws}) > 1
    assert all(len(d) == 2 and len(set(d)) == 2 and all(0 <= i < 8 for i in d) for d in draws)


def test_freeze_trains_exactly_the_chosen_layers(tiny_model):
    from fttrain.methods import PeftSetupError, apply_peft

    cfg = compose(["+exp=tiny_full", "peft=freeze", "peft.trainable_layers=-1", "peft.train_head=true",
                   "peft.trainable_patterns=[norm.weight$]"])
    model = apply_peft(tiny_model(), cfg.peft, gradient_checkpointing=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("model.layers.")} >= {
        n for n, _ in model.named_parameters() if n.startswith("model.layers.0.")}
    assert not any(n.startswith("model.layers.3.self_attn") for n in trainable)
    assert "lm_head.weight" in trainable and "model.norm.weight" in trainable
    assert "model.embed_tokens.weight" not in trainable
    cfg = compose(["+exp=tiny_full", "peft=freeze", "peft.trainable_patterns=[nonexistent]"])
    with pytest.raises(PeftSetupError, match="matches no parameter"):
        apply_peft(tiny_model(), cfg.peft, gradient_checkpointing=False)


def test_loraplus_gives_b_matrices_the_larger_rate(tiny_model):
    from fttrain.methods import apply_peft
    from fttrain.methods.lora import loraplus_param_groups

    cfg = compose(["+exp=tiny_sft", "peft=loraplus", "peft.loraplus_lr_ratio=16"])
    model = apply_peft(tiny_model(), cfg.peft, gradient_checkpointing=False)
    groups = loraplus_param_groups(model, 1e-3, 0.0, 16)
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    b = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    a = {id(p) for n, p in model.named_parameters() if "lora_A" in n}
    assert ids(groups[1]) == b and groups[1]["lr"] == pytest.approx(1.6e-2)
    assert ids(groups[0]) == a and groups[0]["lr"] == pytest.approx(1e-3)
