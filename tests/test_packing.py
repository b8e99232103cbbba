"""Packed samples never attend to each other: packed logits equal per-sample logits."""

import pytest
import torch

from fttrain.data.packing import PackedCollator, PaddingCollator, pack
from fttrain.data.tokenize import IGNORE


@pytest.fixture(scope="module")
def samples():
    g = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate([7, 12, 5, 9]):
        ids = torch.randint(10, 300, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] + ids[1:], "sample_id": i})
    return out


def load(tiny_dir, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=attn, dtype=torch.float32)
    # Random-looking weights make leaks visible: the built model is a fresh init.
    return model.eval()


def per_sample_logits(model, samples):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s["input_ids"]]), use_cache=False).logits[0] for s in samples]


# flex_attention: fttrain flattens packed rows for it (fttrain.config.schema.flattens_packed_rows);
# transformers compiles it, on CPU through inductor's C++ backend (slow: a slow test).
@pytest.mark.parametrize("attn, flatten", [("sdpa", True), ("sdpa", False), ("eager", True), ("eager", False),
                                           pytest.param("flex_attention", True, marks=pytest.mark.slow)])
def test_packed_logits_equal_per_sample_logits(tiny_dir, samples, attn, flatten):
    model = load(tiny_dir, attn)
    reference = per_sample_logits(model, samples)
    rows = pack(samples, capacity=20)
    assert len(rows) > 1 and any(len(r["sample_ids"]) > 1 for r in rows)  # several samples share a row
    batch = PackedCollator(pad_token_id=0, flatten=flatten)(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    # Walk the batch and cut it back into samples.
    for b in range(batch["input_ids"].shape[0]):
        pos = batch["position_ids"][b].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for s, e in zip(starts, starts[1:]):
            seg = batch["input_ids"][b, s:e].tolist()
            match = [k for k, smp in enumerate(samples) if smp["input_ids"] == seg]
            if not match:  # the padding tail of a stacked row
                assert all(t == 0 for t in seg)
                continue
            torch.testing.assert_close(logits[b, s:e], reference[match[0]], rtol=1e-4, atol=1e-4)


def test_a_kv_cache_breaks_packing_which_is_why_it_is_off(tiny_dir, samples):
    """transformers skips packed-sequence detection when a cache is passed; the
    samples then attend to each other. fttrain runs packed passes with use_cache=False."""
    from transformers import DynamicCache

    model = load(tiny_dir, "sdpa")
    reference = per_sample_logits(model, samples[:2])
    row = pack(samples[:2], capacity=40)[0]
    batch = PackedCollator(0, flatten=True)([row])
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      past_key_values=DynamicCache(config=model.config), use_cache=True).logits[0]
    n0 = len(samples[0]["input_ids"])
    second = leaky[n0:] if row["sample_ids"][0] == 0 else leaky[len(samples[1]["input_ids"]):]
    other = reference[1] if row["sample_ids"][0] == 0 else reference[0]
    assert (second - other).abs().max() > 1e-2


def test_packed_loss_equals_unpacked_loss(tiny_dir, samples):
    model = load(tiny_dir, "sdpa")
    n_items = sum(sum(1 for l in s["labels"][1:] if l != IGNORE) for s in samples)
    rows_unpacked = [{"input_ids": s["input_ids"], "labels": s["labels"], "sample_ids": [s["sample_id"]]} for s in samples]
    padded = PaddingCollator(pad_token_id=0)(rows_unpacked)
    packed = PackedCollator(0, flatten=False)(pack(samples, capacity=20))
    with torch.no_grad():
        l_pad = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"],
                      num_items_in_batch=n_items, use_cache=False).loss
        l_pack = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"],
                       num_items_in_batch=n_items, use_cache=False).loss
    torch.testing.assert_close(l_pack, l_pad, rtol=1e-5, atol=1e-5)
    assert int(packed["num_real_tokens"]) == sum(len(s["input_ids"]) for s in samples)
