"""fttrain prune: structured pruning equals masking the removed parts, unstructured pruning hits its
target and survives a reload, a recovery run lowers the eval loss, and bad input is refused."""

import json
import shlex

import pytest
import torch

from conftest import fttrain_command, run_cli
from fttrain.prune import PruneError, prune

HEADS, CHANNELS = 1, 96  # of the tiny model's 2 KV groups (4 query heads) and 352 channels per layer


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def structured(learned_run, tmp_path_factory):
    """The learned run's merged export with HEADS KV groups and CHANNELS MLP channels removed per layer."""
    out = tmp_path_factory.mktemp("prune") / "structured"
    report = prune(learned_run["merged"], out, heads=HEADS, mlp_channels=CHANNELS, calibration_rows=8)
    return out, report


@pytest.mark.slow
def test_structured_pruning_equals_the_original_with_those_parts_masked(learned_run, structured):
    out, report = structured
    original, pruned = load(learned_run["merged"]), load(out)
    config, small = original.config, pruned.config
    group = config.num_attention_heads // config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    assert small.num_key_value_heads == config.num_key_value_heads - HEADS
    assert small.num_attention_heads == config.num_attention_heads - HEADS * group
    assert small.head_dim == head_dim and small.hidden_size == config.hidden_size
    assert small.intermediate_size == config.intermediate_size - CHANNELS
    assert json.loads((out / "prune_report.json").read_text()) == json.loads(json.dumps(report))

    removed_groups = report["structured"]["removed_kv_groups"]
    removed_channels = report["structured"]["removed_mlp_channels"]
    assert len(removed_groups) == len(removed_channels) == config.num_hidden_layers
    with torch.no_grad():
        for layer, big, groups, chans in zip(pruned.model.layers, original.model.layers, removed_groups,
                                             removed_channels):
            q_width = small.num_attention_heads * head_dim
            assert layer.self_attn.q_proj.weight.shape == (q_width, config.hidden_size)
            assert layer.self_attn.k_proj.weight.shape == (small.num_key_value_heads * head_dim, config.hidden_size)
            assert layer.self_attn.v_proj.weight.shape == (small.num_key_value_heads * head_dim, config.hidden_size)
            assert layer.self_attn.o_proj.weight.shape == (config.hidden_size, q_width)
            assert layer.mlp.gate_proj.weight.shape == (small.intermediate_size, config.hidden_size)
            assert layer.mlp.down_proj.weight.shape == (config.hidden_size, small.intermediate_size)
            assert len(groups) == HEADS and len(chans) == CHANNELS
            # Masking: a removed query head writes nothing through o_proj, a removed channel nothing through down_proj.
            for g in groups:
                big.self_attn.o_proj.weight[:, g * group * head_dim:(g + 1) * group * head_dim] = 0
            big.mlp.down_proj.weight[:, chans] = 0
        ids = torch.randint(0, config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
        masked, got = original(input_ids=ids).logits, pruned(input_ids=ids).logits
    assert (masked - got).abs().max() < 1e-4
    # Removing something changes the model: the check above is not vacuous.
    assert (load(learned_run["merged"])(input_ids=ids).logits - got).abs().max() > 1e-3


@pytest.mark.slow
def test_structured_pruning_calibrates_on_training_rows_not_the_scored_ones(learned_run, structured):
    """The removed parts are the ranking on evenly spaced training samples: the eval rows the
    report scores never choose them (ranking on those would flatter the pruned eval loss)."""
    _, report = structured
    from fttrain.compare import eval_items, eval_set
    from fttrain.data.store import PreparedRows
    from fttrain.prune import calibration_items, importance, least_important, load_source, training_rows

    assert report["structured"]["calibration_split"] == "train"
    assert report["structured"]["calibration_rows"] == 8
    source = load_source(learned_run["merged"])
    split = eval_set(source.run)["split"]
    train, held_out = training_rows(source.run, split), PreparedRows(split)
    assert train.folder != held_out.folder and train.num_samples > 8

    def removed(items):
        scores = importance(source.model, items, source.tokenizer.pad_token_id)
        return least_important(scores["channels"], CHANNELS)

    assert report["structured"]["removed_mlp_channels"] == removed(calibration_items(train, 8))
    assert report["structured"]["removed_mlp_channels"] != removed(eval_items(held_out, 8))
    assert report["structured"]["removed_mlp_channels"] != removed([{**train.sample(i), "sample_ids": [i]}
                                                                     for i in range(8)])  # not the first 8


@pytest.mark.slow
def test_structured_pruning_removes_the_parts_that_matter_least(learned_run, structured):
    """The importance ranking beats its opposite: removing the most important parts costs more."""
    _, report = structured
    from fttrain.compare import eval_set, quality
    from fttrain.data.store import PreparedRows
    from fttrain.prune import calibration_items, importance, load_source, shrink, training_rows

    source = load_source(learned_run["merged"])
    split = eval_set(source.run)["split"]
    rows = PreparedRows(split)
    scores = importance(source.model, calibration_items(training_rows(source.run, split), 8),
                        source.tokenizer.pad_token_id)
    worst = shrink(source.model, scores["heads"].topk(HEADS, dim=1).indices.tolist(),
                   scores["channels"].topk(CHANNELS, dim=1).indices.tolist())
    worst_loss = quality(worst, rows, source.tokenizer.pad_token_id, "cpu", None)["eval_loss"]
    assert report["source"]["eval_loss"] < report["pruned"]["eval_loss"] < worst_loss


class Rows:
    """A split of ``n`` one-token samples, sample i being token i."""

    def __init__(self, n, layout="samples"):
        self.n, self.layout = n, layout
        self.num_samples = n

    def __len__(self):
        return self.n

    def sample(self, i):
        return {"input_ids": [i], "labels": [i]}

    def __getitem__(self, i):
        return {"input_ids": [i], "labels": [i], "sample_ids": [i]}


@pytest.mark.parametrize("n, count, picked", [
    (100, 4, [0, 25, 50, 75]),  # spread over the split, not the first four
    (10, 3, [0, 3, 6]),
    (5, 8, [0, 1, 2, 3, 4]),  # a split smaller than asked for: all of it
])
def test_calibration_samples_are_evenly_spaced_over_the_split(n, count, picked):
    from fttrain.prune import calibration_items

    for layout in ("samples", "blocks"):
        items = calibration_items(Rows(n, layout), count)
        assert [item["input_ids"][0] for item in items] == picked
        assert [item["sample_ids"] for item in items] == [[i] for i in picked]


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_pruning_hits_the_target_and_keeps_its_zeros_on_disk(learned_run, tmp_path, scope):
    sparsity = 0.5
    report = prune(learned_run["merged"], tmp_path / "sparse", sparsity=sparsity, scope=scope)
    original, pruned = load(learned_run["merged"]), load(tmp_path / "sparse")  # from disk: the zeros were saved
    before, after = original.state_dict(), pruned.state_dict()
    assert before.keys() == after.keys()
    prunable = [k for k in after if k.startswith("model.layers.") and k.endswith("_proj.weight")]
    assert len(prunable) == 7 * original.config.num_hidden_layers
    zeros = {k: int((after[k] == 0).sum()) for k in prunable}
    sizes = {k: after[k].numel() for k in prunable}
    if scope == "layer":
        for k in prunable:
            assert abs(zeros[k] - sparsity * sizes[k]) <= 1, k
            dropped = before[k][after[k] == 0].abs()
            assert dropped.max() <= before[k][after[k] != 0].abs().min(), k  # the smallest went
    else:
        assert abs(sum(zeros.values()) - sparsity * sum(sizes.values())) <= 1
        assert max(zeros[k] / sizes[k] for k in prunable) - min(zeros[k] / sizes[k] for k in prunable) > 0.01
        dropped = torch.cat([before[k][after[k] == 0].abs() for k in prunable])
        assert dropped.max() <= torch.cat([before[k][after[k] != 0].abs() for k in prunable]).min()
    for k in prunable:  # what was kept is unchanged
        assert torch.equal(after[k], torch.where(after[k] == 0, torch.zeros_like(before[k]), before[k])), k
    for k in set(after) - set(prunable):  # embeddings, lm_head, norms
        assert torch.equal(after[k], before[k]), k
    assert report["pruned"]["sparsity"] == pytest.approx(sparsity, abs=1e-5)
    assert report["source"]["sparsity"] < 1e-3
    assert report["pruned"]["params"] == report["source"]["params"]
    assert report["unstructured"] == {"target_sparsity": sparsity, "scope": scope}


@pytest.mark.slow
def test_cli_prunes_an_adapter_run_and_scores_it_like_the_run(learned_run, tmp_path):
    run = learned_run["run"]
    out = tmp_path / "pruned"
    proc = fttrain_command(["prune", str(run), "--out", str(out), "--mlp-channels", "32", "--sparsity", "0.2",
                            "--scope", "layer"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "prune_report.json").read_text())
    assert not (tmp_path / "pruned.tmp").exists()
    assert "| pruned |" in proc.stdout and "model.name_or_path=" in proc.stdout
    assert "calibration: 8 samples of the train split" in proc.stdout
    # The adapter merged in memory scores what the run itself measured on its eval split.
    assert report["source"]["eval_loss"] == pytest.approx(json.loads((run / "metrics.json").read_text())["eval_loss"],
                                                          abs=1e-3)
    assert report["pruned"]["params"] < report["source"]["params"]
    assert report["pruned"]["sparsity"] == pytest.approx(0.2, abs=1e-3)
    assert load(out).config.intermediate_size == 352 - 32


@pytest.mark.slow
def test_recovery_fine_tune_lowers_the_pruned_models_eval_loss(learned_run, structured, tmp_path):
    from fttrain.compare import eval_set, quality
    from fttrain.data.store import PreparedRows
    from fttrain.prune import load_source

    out, report = structured
    command = shlex.split(report["recover_command"])
    assert command[:3] == ["python", "-m", "fttrain"] and f"model.name_or_path={out.resolve()}" in command
    proc = run_cli([*command[3:], "trainer.max_steps=8"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recovered = load_source(tmp_path / "outputs" / f"{out.name}_recover")  # its LoRA adapter merged
    rows = PreparedRows(eval_set(learned_run["run"])["split"])  # the rows the report scored
    after = quality(recovered.model, rows, recovered.tokenizer.pad_token_id, "cpu", None)
    assert after["eval_tokens"] == report["pruned"]["eval_tokens"]
    assert after["eval_loss"] < report["pruned"]["eval_loss"]


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kwargs, flag", [
    ({"sparsity": 1.0}, "--sparsity 1.0"),
    ({"sparsity": -0.1}, "--sparsity -0.1"),
    ({"heads": -1}, "--heads -1"),
    ({}, "nothing to prune"),
    ({"sparsity": 0.5, "eval_rows": 0}, "--eval-rows 0"),
])
def test_bad_amounts_are_refused_naming_the_flag(tmp_path, kwargs, flag):
    with pytest.raises(PruneError, match=flag):
        prune(tmp_path, tmp_path / "out", **kwargs)


def test_a_plain_model_folder_needs_a_run(tiny_dir, tmp_path):
    with pytest.raises(PruneError, match="--run RUN"):
        prune(tiny_dir, tmp_path / "out", sparsity=0.5)
    with pytest.raises(PruneError, match="--run"):
        prune(tiny_dir, tmp_path / "out", sparsity=0.5, run=str(tmp_path))  # not a run directory


@pytest.mark.slow
def test_a_model_with_another_tokenizer_than_the_runs_is_refused(learned_run, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "other"
    model = load(learned_run["merged"])
    model.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(learned_run["merged"])
    tok.add_tokens(["<|another|>"])
    tok.save_pretrained(folder)
    with pytest.raises(PruneError, match="does not use the tokenizer of the run"):
        prune(folder, tmp_path / "out", sparsity=0.5, run=str(learned_run["run"]))


def test_cli_refuses_a_missing_source_with_exit_2(tmp_path):
    proc = fttrain_command(["prune", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--heads", "1"],
                           cwd=tmp_path)
    assert proc.returncode == 2
    assert "fttrain prune: error:" in proc.stderr and "nowhere" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_more_heads_or_channels_than_exist_are_refused(learned_run, tmp_path):
    with pytest.raises(PruneError, match="--heads 2: each layer has 2 KV groups"):
        prune(learned_run["merged"], tmp_path / "out", heads=2)
    with pytest.raises(PruneError, match="--mlp-channels 352"):
        prune(learned_run["merged"], tmp_path / "out", mlp_channels=352)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_another_architecture_is_refused_naming_what_is_missing(learned_run, tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(PruneError, match="GPT2LMHeadModel: no decoder layers"):
        prune(folder, tmp_path / "out", sparsity=0.5, run=str(learned_run["run"]))


@pytest.mark.parametrize("family, kv_heads", [("qwen2", 2), ("mistral", 4)])
def test_shrinking_other_families_equals_masking(family, kv_heads):
    """Qwen2 (q/k/v biases, grouped-query) and Mistral without grouping (a group is one head):
    removing KV groups and channels gives the logits of the original with them masked."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fttrain.prune import shrink

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=kv_heads)
    original = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in original.parameters():  # biases start at zero; random ones make slicing them matter
            p.normal_(0, 0.2)
    original.generation_config.eos_token_id, original.generation_config.temperature = [2, 7], 0.6  # an instruct model's
    groups, chans = [[0], [kv_heads - 1]], [[1, 5], [0, 47]]
    pruned = shrink(original, groups, chans)
    assert pruned.generation_config.eos_token_id == [2, 7] and pruned.generation_config.temperature == 0.6
    group, head_dim = 4 // kv_heads, 64 // 4
    assert pruned.config.num_attention_heads == 4 - group and pruned.config.num_key_value_heads == kv_heads - 1
    if family == "qwen2":
        assert pruned.model.layers[0].self_attn.k_proj.bias.shape == ((kv_heads - 1) * head_dim,)
    with torch.no_grad():
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
        got = pruned(input_ids=ids).logits
        for layer, g, c in zip(original.model.layers, groups, chans):
            layer.self_attn.o_proj.weight[:, g[0] * group * head_dim:(g[0] + 1) * group * head_dim] = 0
            layer.mlp.down_proj.weight[:, c] = 0
        assert (original(input_ids=ids).logits - got).abs().max() < 1e-4
