"""fttrain estimate: the exact parts (parameter counts; bytes of weights,
gradients and optimizer states per plan and world size) from a config alone.
The activation and logits terms are a model; the GPU check compares the total
with measured peaks."""

import logging

import pytest

from conftest import compose

GIB = 2 ** 30
LLAMA3_8B = 8_030_261_248  # Meta's published parameter count
LORA_R16_ALL_LINEAR = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))  # 41,943,040


@pytest.fixture(scope="module")
def llama8b_config(tmp_path_factory):
    """Llama-3.1-8B's config.json alone: the estimate never reads weights."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama8b")
    LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                tie_word_embeddings=False).save_pretrained(folder)
    return folder


def test_parameter_counts_match_the_loaded_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    from fttrain.estimate import estimate
    from fttrain.methods import apply_peft

    for exp in ("tiny_sft", "tiny_full"):
        cfg = compose([f"+exp={exp}"])
        real = apply_peft(AutoModelForCausalLM.from_pretrained(tiny_dir), cfg.peft, False)
        got = estimate(cfg)
        assert got.params == sum(p.numel() for p in real.parameters())
        assert got.trained == sum(p.numel() for p in real.parameters() if p.requires_grad) > 0


def test_an_8b_model_is_counted_from_its_config_alone(llama8b_config):
    from fttrain.estimate import estimate

    full = estimate(compose(["+exp=tiny_full", f"model.name_or_path={llama8b_config}"]))
    assert full.params == full.trained == LLAMA3_8B
    lora = estimate(compose(["+exp=tiny_sft", f"model.name_or_path={llama8b_config}"]))
    assert lora.trained == LORA_R16_ALL_LINEAR and lora.params == LLAMA3_8B + LORA_R16_ALL_LINEAR


@pytest.mark.parametrize("dist, world, weights, grads, optim", [
    # bytes per parameter on one device for an 8B full fine-tune under bf16 (fp32 masters, AdamW)
    ("ddp", 1, 4, 4, 8),
    ("ddp", 8, 4, 8, 8),  # the reducer's buckets: a second copy of the gradients
    ("zero1", 8, 2, 2, 12 / 8),  # DeepSpeed: bf16 weights and gradients, fp32 master + 2 moments sharded
    ("zero2", 8, 2, 2 / 8, 12 / 8),
    ("zero3", 8, 2 / 8, 2 / 8, 12 / 8),  # + two layers gathered whole
    ("zero2_offload", 8, 2, 2 / 8, 0),
    ("fsdp", 8, 4 / 8, 4 / 8, 8 / 8),  # + two layers gathered whole
])
def test_weights_gradients_and_optimizer_per_plan_and_world_size(llama8b_config, dist, world, weights, grads, optim):
    from fttrain.estimate import estimate

    cfg = compose(["+exp=tiny_full", f"model.name_or_path={llama8b_config}", f"dist={dist}", "precision=bf16"])
    got = estimate(cfg, world_size=world).parts
    gathered = 2 * 2 * LLAMA3_8B / 32 if dist in ("zero3", "fsdp") else 0  # two layers' bf16 weights
    assert got["weights"] == pytest.approx(weights * LLAMA3_8B + gathered, rel=1e-9)
    assert got["gradients"] == pytest.approx(grads * LLAMA3_8B, rel=1e-9)
    assert got["optimizer"] == pytest.approx(optim * LLAMA3_8B, rel=1e-9)


def test_the_memory_knobs_each_lower_the_estimate(llama8b_config):
    from fttrain.estimate import estimate

    base = ["+exp=tiny_sft", f"model.name_or_path={llama8b_config}", "precision=bf16", "data.max_length=4096",
            "trainer.micro_batch_size=2"]
    plain = estimate(compose(base)).parts
    checkpointed = estimate(compose(base + ["trainer.gradient_checkpointing=true"])).parts
    chunked = estimate(compose(base + ["trainer.loss=chunked"])).parts
    liger = estimate(compose(base + ["trainer.loss=liger"])).parts
    eight_bit = estimate(compose(base + ["trainer.optim=adamw_bnb_8bit"])).parts
    assert checkpointed["activations"] < plain["activations"] / 10
    # 8,192 tokens x 128,256 logits x 10 bytes; chunked: 1,024 positions at a time
    assert plain["logits"] == 8192 * 128256 * 10 and chunked["logits"] == 1024 * 128256 * 10
    # Liger: 8,192 / ceil(128,256 / 4,096) = 8,192 / 32 = 256 positions at a time
    assert liger["logits"] == 256 * 128256 * 10
    assert eight_bit["optimizer"] == plain["optimizer"] / 4


def test_qlora_weights_are_a_quarter_byte_per_weight_and_a_bit(llama8b_config):
    from fttrain.estimate import estimate

    got = estimate(compose(["+exp=llama8b_qlora", f"model.name_or_path={llama8b_config}"])).parts["weights"]
    embeddings = 2 * 128256 * 4096  # input embeddings and lm_head stay bf16
    quantised = LLAMA3_8B - embeddings - 32 * 2 * 4096 - 4096  # the norms stay too
    assert 0.5 * quantised < got - 2 * embeddings < 0.6 * quantised


def test_a_warning_when_the_estimate_exceeds_the_gpu(llama8b_config, caplog):
    from fttrain.estimate import report

    cfg = compose(["+exp=tiny_full", f"model.name_or_path={llama8b_config}", "precision=bf16"])
    with caplog.at_level(logging.INFO, logger="fttrain"):
        result = report(cfg, 1, logging.getLogger("fttrain"), memory=80 * GIB)
    assert result.total > 80 * GIB
    assert "exceeds this GPU's 80.0 GiB" in caplog.text and "weights" in caplog.text


def test_the_cli_says_which_model_it_cannot_read(capsys):
    from fttrain.estimate import main

    assert main(["+exp=tiny_sft", "model.name_or_path=/no/such/model"]) == 2
    assert "model.name_or_path=/no/such/model: no config.json" in capsys.readouterr().err


def test_a_multimodal_config_is_estimated_from_its_text_model(tmp_path):
    # Gemma 3's config nests the language model's shape under text_config.
    from transformers import Gemma3Config

    from fttrain.estimate import estimate

    config = Gemma3Config()
    config.save_pretrained(tmp_path)
    got = estimate(compose(["+exp=tiny_sft", f"model.name_or_path={tmp_path}", "precision=bf16",
                            "data.max_length=128", "trainer.micro_batch_size=1"]))
    text = config.get_text_config()
    assert got.parts["logits"] == 128 * text.vocab_size * 10
    assert got.params > got.trained > 0 and got.parts["activations"] > 0
