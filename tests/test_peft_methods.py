"""Every PEFT method trains the tiny model a few steps through the real recipe
(in-process): the eval loss falls, only the method's parameters change, the
saved result reloads to identical outputs, and mergeable methods export to a
plain transformers model with the same logits."""

import json
import re

import pytest
import torch

from conftest import compose

pytestmark = pytest.mark.slow

# method -> (experiment, extra overrides, regex every trainable parameter name matches)
METHODS = {
    "lora": ("tiny_sft", [], r"lora_[AB]"),
    "rslora": ("tiny_sft", [], r"lora_[AB]"),
    "dora": ("tiny_sft", [], r"lora_[AB]|lora_magnitude_vector"),
    "loraplus": ("tiny_sft", [], r"lora_[AB]"),
    "pissa": ("tiny_sft", [], r"lora_[AB]"),
    "qlora": ("tiny_sft", [], r"lora_[AB]"),
    "qlora8": ("tiny_sft", [], r"lora_[AB]"),
    "ia3": ("tiny_sft", ["trainer.learning_rate=5e-2"], r"ia3_l"),
    "vera": ("tiny_sft", ["trainer.learning_rate=5e-2"], r"vera_lambda_[bd]"),
    "loha": ("tiny_sft", ["trainer.learning_rate=1e-2"], r"hada_"),
    "lokr": ("tiny_sft", ["trainer.learning_rate=1e-2"], r"lokr_"),
    "oft": ("tiny_sft", [], r"oft_"),
    "adalora": ("tiny_sft", ["trainer.learning_rate=5e-3"], r"lora_[ABE]"),
    "prompt_tuning": ("tiny_sft", ["data.packing=false", "trainer.learning_rate=5e-2"], r"prompt_encoder"),
    "prefix_tuning": ("tiny_sft", ["data.packing=false", "trainer.learning_rate=1e-2"], r"prompt_encoder"),
    "p_tuning": ("tiny_sft", ["data.packing=false", "trainer.learning_rate=1e-2"], r"prompt_encoder"),
    "llama_adapter": ("tiny_sft", ["trainer.learning_rate=5e-2"], r"adaption_(prompt|gate)"),
    "fourierft": ("tiny_sft", ["trainer.learning_rate=5e-2"], r"fourierft_spectrum"),
    "adapter": ("tiny_sft", ["peft.r=16"], r"bottleneck_adapter"),
    "adapter_parallel": ("tiny_sft", ["peft.r=16"], r"bottleneck_adapter"),
    "full": ("tiny_full", [], r"."),
    "freeze": ("tiny_full", ["trainer.learning_rate=1e-3"], r"^model\.layers\.[23]\."),
    "galore": ("tiny_full", ["trainer.learning_rate=1e-3", "peft.rank=8", "peft.update_proj_gap=4"], r"."),
    "lisa": ("tiny_full", ["trainer.learning_rate=1e-3", "peft.active_layers=1", "peft.switch_every=3"], r"."),
}
MERGEABLE = {"lora", "rslora", "dora", "loraplus", "pissa", "qlora", "qlora8", "ia3", "vera", "loha", "lokr", "oft",
             "adalora", "fourierft"}


def train(method, tmp_path, extra=()):
    from fttrain.run import prepare_run_dir
    from fttrain.run import write_run_info
    from fttrain.recipes.sft import SFTRecipe

    exp, overrides, _ = METHODS[method]
    cfg = compose([f"+exp={exp}", f"peft={method}", f"name={method}", f"output_root={tmp_path}",
                   "trainer.max_steps=8", "dist=single", *overrides, *extra])
    run_dir = tmp_path / method
    prepare_run_dir(cfg, run_dir)
    recipe = SFTRecipe(cfg, run_dir)
    recipe.setup()
    write_run_info(cfg, run_dir, recipe)
    start = {n: p.detach().clone() for n, p in recipe.model.named_parameters()}
    trainable = {n for n, p in recipe.model.named_parameters() if p.requires_grad}
    before = recipe.trainer.evaluate()["eval_loss"]
    recipe.train()
    metrics = recipe.save()
    return recipe, run_dir, start, trainable, before, metrics


def batch(n=3, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n, length), generator=g)


@torch.no_grad()
def logits(model, x):
    model.eval()
    return model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_learns_changes_only_its_parameters_and_reloads(method, tmp_path):
    from fttrain.models.adapted import load_for_inference

    recipe, run_dir, start, trainable, before, metrics = train(method, tmp_path)
    pattern = re.compile(METHODS[method][2])

    # It learns: the held-out loss falls below the untrained model's.
    assert metrics["eval_loss"] < before - 0.01, (before, metrics["eval_loss"])

    # Only the intended parameters were trainable, and only they changed.
    assert trainable and all(pattern.search(n) for n in trainable), sorted(trainable)[:5]
    now = dict(recipe.model.named_parameters())
    changed = {n for n in start if not torch.equal(start[n], now[n].detach())}
    assert changed, "no parameter changed"
    assert changed <= trainable, sorted(changed - trainable)[:5]
    assert metrics["trainable_params"] > 0 and metrics["trainable_percent"] <= 100
    if method not in ("full", "galore", "lisa"):
        assert metrics["trainable_percent"] < 60

    # The saved result reloads (as a user would, from the run directory) to the same outputs.
    x = batch()
    loaded = load_for_inference(run_dir)
    assert torch.allclose(logits(loaded.model, x), logits(recipe.model, x), atol=1e-5, rtol=0)

    if method in MERGEABLE:
        from transformers import AutoModelForCausalLM

        from fttrain.export import export_merged

        report = export_merged(run_dir, run_dir / "merged")
        assert report["max_abs_logit_diff"] <= 1e-4 and report["argmax_agreement"] == 1.0
        merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
        assert not any("lora" in n or "ia3" in n or "vera" in n for n, _ in merged.named_parameters())
        ref = logits(recipe.model, x)
        atol = 5e-2 if method == "qlora8" else 1e-4  # LLM.int8 quantises activations too (see export docs)
        assert torch.allclose(logits(merged, x), ref, atol=atol, rtol=0)


def test_lisa_switches_the_trained_layers_every_k_steps(tmp_path):
    from fttrain.methods.lisa import draw_layers

    # A seed whose first two draws differ (draws are uniform, so a repeat is legitimate).
    seed = next(s for s in range(1, 100) if draw_layers(s, 0, 4, 1) != draw_layers(s, 1, 4, 1))
    recipe, run_dir, start, _, _, metrics = train("lisa", tmp_path, ["trainer.max_steps=6", f"trainer.seed={seed}"])
    lines = [json.loads(l) for l in (run_dir / "train_log.jsonl").read_text().splitlines()]
    drawn = {row["step"]: tuple(row["lisa_layers"]) for row in lines if "lisa_layers" in row}
    expected = {step: tuple(draw_layers(seed, (step - 1) // 3, 4, 1)) for step in range(1, 7)}
    assert drawn == expected
    assert len(set(drawn.values())) == 2  # a new draw after step 3
    now = dict(recipe.model.named_parameters())
    active = {i for layers in drawn.values() for i in layers}
    for i in range(4):
        moved = any(not torch.equal(start[n], now[n].detach()) for n in start if n.startswith(f"model.layers.{i}."))
        assert moved == (i in active), (i, active)
    assert metrics["trainable_params"] < metrics["total_params"]  # one layer + embeddings + head at a time


def test_qlora_export_merges_into_dequantised_weights_not_4bit(tmp_path):
    from fttrain.export import compare, export_merged, gate_inputs, logits_of
    from fttrain.models.adapted import load_for_inference

    _, run_dir, *_ = train("qlora", tmp_path)
    report = export_merged(run_dir, tmp_path / "merged")
    assert report["merged_into"].startswith("dequantized") and report["dequantized_layers"] == 7 * 4
    assert report["quantized_forward_gap"] <= 1e-4  # the 16-bit merge computes what the 4-bit model trained
    # What merging on the 4-bit model would have done: re-quantised weights, visibly different logits.
    loaded = load_for_inference(run_dir)
    inputs = gate_inputs(loaded.tokenizer, run_dir / "model", 4)
    ref = logits_of(loaded.model, inputs)
    naive = compare(ref, logits_of(loaded.model.merge_and_unload(), inputs))
    assert naive["max_abs_logit_diff"] > 100 * report["max_abs_logit_diff"]


def test_export_gate_fails_on_a_corrupted_merge_and_writes_nothing(tmp_path, monkeypatch):
    import fttrain.export as export

    _, run_dir, *_ = train("lora", tmp_path)
    real_merge = export.merge_adapter

    def corrupted(model):
        merged = real_merge(model)
        with torch.no_grad():
            merged.model.layers[1].mlp.down_proj.weight.add_(0.05)
        return merged

    monkeypatch.setattr(export, "merge_adapter", corrupted)
    out = tmp_path / "merged"
    with pytest.raises(export.ExportError, match="quality gate failed"):
        export.export_merged(run_dir, out)
    assert not out.exists() and not out.with_name("merged.tmp").exists()


def test_unmergeable_methods_are_refused_or_kept_as_adapters(tmp_path, capsys):
    from fttrain.export import main

    _, run_dir, *_ = train("prompt_tuning", tmp_path)
    assert main([str(run_dir)]) == 2
    assert "cannot be merged into the base weights" in capsys.readouterr().err
    assert not (run_dir / "merged").exists()
    assert main([str(run_dir), "--keep-unmerged"]) == 0
    assert (run_dir / "merged" / "adapter_config.json").exists()


def test_several_adapters_switch_and_combine_by_weight(tmp_path, capsys):
    from fttrain.export import main as export_main
    from fttrain.models.adapted import load_for_inference

    _, run_a, *_ = train("lora", tmp_path / "a")
    _, run_b, *_ = train("lora", tmp_path / "b", ["trainer.seed=7", "trainer.learning_rate=3e-3"])
    x = batch()
    both = load_for_inference(run_a, extra_adapters={"b": str(run_b)})
    assert both.adapters == ["default", "b"]
    la = logits(both.model, x)
    both.model.set_adapter("b")
    lb = logits(both.model, x)
    assert not torch.allclose(la, lb, atol=1e-3)  # switching changes the outputs
    only_b = load_for_inference(run_b)
    assert torch.allclose(lb, logits(only_b.model, x), atol=1e-5)

    out = tmp_path / "combined"
    assert export_main(["--adapter", f"a={run_a}", "--adapter", f"b={run_b}", "--weights", "a=0.5,b=0.5",
                        "--combination", "linear", "--out", str(out)]) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["max_abs_logit_diff"] <= 1e-4 and report["weights"] == {"a": 0.5, "b": 0.5}
    from transformers import AutoModelForCausalLM

    combined = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), x)
    assert not torch.allclose(combined, la, atol=1e-3) and not torch.allclose(combined, lb, atol=1e-3)


def test_8bit_and_paged_optimizers_train_on_cpu(tmp_path, caplog):
    import bitsandbytes as bnb

    with caplog.at_level("WARNING", logger="fttrain"):
        recipe, _, _, _, before, metrics = train("lora", tmp_path, ["trainer.optim=paged_adamw_8bit"])
    assert "using adamw_bnb_8bit on CPU" in caplog.text
    inner = getattr(recipe.trainer.optimizer, "optimizer", recipe.trainer.optimizer)
    assert isinstance(inner, bnb.optim.optimizer.Optimizer8bit) and inner.args.optim_bits == 8
    assert metrics["eval_loss"] < before


def test_loraplus_and_galore_use_their_optimizers(tmp_path):
    recipe, *_ = train("loraplus", tmp_path / "lp")
    inner = getattr(recipe.trainer.optimizer, "optimizer", recipe.trainer.optimizer)
    lrs = sorted({g["initial_lr"] for g in inner.param_groups})
    assert lrs == pytest.approx([1e-3, 16e-3])
    recipe, *_ = train("galore", tmp_path / "gl")
    inner = getattr(recipe.trainer.optimizer, "optimizer", recipe.trainer.optimizer)
    assert type(inner).__module__ == "galore_torch.adamw"
    ranks = {g.get("rank") for g in inner.param_groups}
    assert 8 in ranks  # the projected group carries GaLore's rank


def test_qlora_run_via_cli_reports_its_parameters(tmp_path):
    from conftest import run_cli

    proc = run_cli(["+exp=tiny_sft", "peft=qlora", "peft.use_dora=true", "trainer.max_steps=2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"parameters \(peft=qlora\): \d+ trainable of \d+", proc.stderr + proc.stdout)
    metrics = json.loads((tmp_path / "outputs" / "tiny_sft" / "metrics.json").read_text())
    assert metrics["peft_method"] == "qlora" and 0 < metrics["trainable_percent"] < 100
    adapter_cfg = json.loads((tmp_path / "outputs" / "tiny_sft" / "model" / "adapter_config.json").read_text())
    assert adapter_cfg["use_dora"] is True


def test_generate_cli_streams_writes_jsonl_and_chats(tmp_path):
    import subprocess
    import sys

    _, run_dir, *_ = train("lora", tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Reverse: a b c"}) + "\n" +
                       json.dumps({"messages": [{"role": "user", "content": "Reverse: d e"}]}) + "\n")
    out = tmp_path / "answers.jsonl"
    run = lambda *a, **kw: subprocess.run([sys.executable, "-m", "fttrain.generate", *a], capture_output=True,  # noqa: E731
                                          text=True, timeout=300, **kw)
    proc = run(str(run_dir), "--prompts", str(prompts), "--out", str(out), "--temperature", "0",
               "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["generated"], str) for r in rows)
    assert rows[1]["messages"][0]["content"] == "Reverse: d e"
    # Greedy output equals the in-process generation of the same prompt.
    proc = run(str(run_dir), "--prompt", "Reverse: a b c", "--temperature", "0", "--max-new-tokens", "6")
    assert proc.returncode == 0 and rows[0]["generated"] in proc.stdout
    proc = run(str(run_dir), "--chat", "--max-new-tokens", "4", "--top-k", "5", input="hello\n/reset\nhi again\n")
    assert proc.returncode == 0 and proc.stdout.count("model> ") == 2
    proc = run(str(run_dir), "--prompts", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2 and "missing.jsonl: no such file" in proc.stderr
