"""The 4-bit base behaves the same in eval and in training on every CPU.

bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first
eval-mode forward without gradients (fttrain.models.load.disable_cpu_packed_4bit
says why fttrain keeps it off). These tests run exactly that sequence (the
generations before training do it) on the tiny model, whose 352-wide down_proj is
not a multiple of the 64-wide quantisation block.
"""

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")


def _load_4bit(tiny_dir):
    from fttrain.methods.lora import QLoraConfig
    from fttrain.models.load import load_causal_lm
    from fttrain.methods import quantization_config

    return load_causal_lm(str(tiny_dir), torch.float32, quantization_config(QLoraConfig(), "fp32"))


def _input_grad(model, ids):
    """Gradient of the summed logits w.r.t. the input embeddings: it has to pass
    through every 4-bit layer, as an adapter's gradient does."""
    model.train()
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=emb).logits.sum().backward()
    return emb.grad


def test_4bit_forward_in_eval_mode_matches_dequantised_weights(tiny_dir):
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    model = _load_4bit(tiny_dir)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and any(m.in_features % m.weight.quant_state.blocksize for m in layers), \
        "the tiny model should keep a layer whose width is not a multiple of the block (the case that failed)"
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 2]])
    model.eval()
    with torch.no_grad():  # the "before" generations run exactly this
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    for m in layers:  # still the standard layout: training and eval compute the same thing
        assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False), m
    # Same logits as the same network with each 4-bit weight dequantised into a plain Linear.
    reference = _load_4bit(tiny_dir)
    for name, m in list(reference.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.weight.data = dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                setattr(m, child_name, plain)
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_4bit_layers_pass_gradients_after_an_eval_forward(tiny_dir):
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 2]])
    fresh = _load_4bit(tiny_dir)
    evaluated = _load_4bit(tiny_dir)
    evaluated.eval()
    with torch.no_grad():
        evaluated(ids)
    want, got = _input_grad(fresh, ids), _input_grad(evaluated, ids)
    assert got is not None and got.abs().sum() > 0
    torch.testing.assert_close(got, want)
