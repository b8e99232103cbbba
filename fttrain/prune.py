"""Prune a trained model, score it before and after, and say how to fine-tune it back.

    fttrain prune SRC --out DIR [--sparsity 0.5 [--scope global|layer]] [--heads K] [--mlp-channels N]
                  [--run RUN] [--calibration-rows 8] [--eval-rows N] [--dtype fp32] [--overwrite]

SRC is a run directory (an adapter run is merged into its base in memory
first), an export (``fttrain export``) or a plain Hugging Face model folder.
Only the Llama / Qwen2 / Mistral layout is handled: decoder layers at
``model.layers`` with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``.

Unstructured (``--sparsity S``): the fraction S of the decoder layers' Linear
weights with the smallest magnitude is set to zero; embeddings, lm_head and
norms are untouched. ``--scope global`` ranks all those weights together (a
layer with small weights loses more), ``--scope layer`` prunes each weight
matrix by S on its own. The zeros are the weights (no masks, no hooks), so the
folder loads with plain ``AutoModelForCausalLM``; they are stored densely, so
the file does not shrink: the gain needs sparse storage or kernels.

Structured (``--heads K``, ``--mlp-channels N``): the model really shrinks.
Transformers' Llama-family configs have one head count and one intermediate
size for all layers, so every layer loses the same number: K KV groups (one KV
head with all the query heads that share it, so the grouped-query ratio stays
whole; with as many KV heads as query heads a group is one head) and N MLP
channels, each layer choosing its least important ones on calibration rows
from the training split.
The config keeps ``head_dim`` explicit (hidden_size / num_attention_heads no
longer gives it). Structured pruning runs first; ``--sparsity`` then prunes
what is left.

Data: the run SRC comes from (or ``--run RUN`` for a plain model folder),
prepared as ``fttrain compare`` rebuilds it. ``--calibration-rows`` samples of
its training split, evenly spaced over it, choose what structured pruning
removes; eval loss and perplexity are measured on the first ``--eval-rows``
samples (all by default) of its eval split. Calibration never sees the rows
the model is scored on: ranking on the eval rows would keep what those rows
need and flatter the pruned model's eval loss. A streaming run has no
prepared training rows, so it can only be pruned unstructured.

DIR is written as DIR.tmp, reloaded with plain ``AutoModelForCausalLM`` and
scored from there, then renamed: safetensors weights, config, tokenizer and
``prune_report.json`` (source and pruned: parameters, sparsity, size on disk,
eval loss, perplexity; what was removed and how many samples of which split
calibrated it; the recovery command). The recovery
is a normal fttrain run on DIR, e.g.
``python -m fttrain +exp=tiny_sft model=local model.name_or_path=DIR name=DIR_recover``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from fttrain import atomic, errors
from fttrain.errors import FttrainError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SCOPES = ("global", "layer")
MiB = 2 ** 20


class PruneError(FttrainError, ValueError):
    pass


# ------------------------------------------------------------------ source
@dataclass
class Source:
    model: torch.nn.Module  # a plain transformers model (an adapter already merged)
    tokenizer: object
    folder: Path  # the model or adapter folder SRC names
    kind: str  # "full", or "peft" for an adapter merged into its base here
    run: Optional[Path]  # the run whose training split calibrates and eval split scores it
    size_bytes: Optional[int]  # weight files it needs on disk (an adapter: base + adapter)


def run_of(folder: Path) -> Optional[Path]:
    """The run a model folder came from: its model/, or the adapter an export merged."""
    from fttrain.models.adapted import run_dir_of

    run = run_dir_of(folder)
    report = folder / "export_report.json"
    if run is None and report.exists():
        adapter = json.loads(report.read_text()).get("adapter")
        run = run_dir_of(Path(adapter)) if adapter and Path(adapter).is_dir() else None
    return run


def load_source(src, run: Optional[str] = None, dtype: str = "fp32") -> Source:
    """SRC as a plain model, with the run whose data scores it (``run`` overrides)."""
    from fttrain.compare import weight_bytes
    from fttrain.methods import METHODS
    from fttrain.models.adapted import adapter_method, folder_kind, load_for_inference, model_folder

    folder = model_folder(src)  # refuses a missing path, naming it
    if not folder.is_dir():
        raise PruneError(f"{src}: not a folder; give a run directory, an export or a model folder")
    kind = folder_kind(folder)  # refuses a folder holding no model, naming it
    if run is not None:
        if not (Path(run) / "config.yaml").is_file():
            raise PruneError(f"--run {run}: not a run directory (no config.yaml)")
        data_run = Path(run)
    else:
        data_run = run_of(folder)
        if data_run is None:
            raise PruneError(f"{src} is not from a run: pass --run RUN, a run whose training split calibrates "
                             "and whose eval split scores the model")
    if kind == "bottleneck":
        raise PruneError(f"{folder}: bottleneck adapters cannot be merged into the weights; prune the base "
                         "and train the adapter again")
    declared = METHODS.get(adapter_method(folder)) if kind == "peft" else None
    if declared is not None and declared.merge_note:
        raise PruneError(f"peft={declared.name} cannot be merged into the base weights: {declared.merge_note}")
    # A QLoRA adapter is merged into its base in full precision: pruning needs real weights.
    loaded = load_for_inference(folder, dtype=dtype, quantized=False)
    check_same_tokens(src, loaded.tokenizer, data_run)
    model = loaded.model
    if kind == "peft":
        model = model.merge_and_unload()
        size = (weight_bytes(loaded.base_path) or 0) + (weight_bytes(folder) or 0)
    else:
        size = weight_bytes(folder)
    return Source(model.eval(), loaded.tokenizer, folder, kind, data_run, size)


def check_same_tokens(src, tokenizer, run: Path) -> None:
    """The run's rows are token ids of the run's tokenizer: another vocabulary would
    score and calibrate the model on other tokens than the ones it reads."""
    from transformers import AutoTokenizer

    from fttrain.models.load import vocabulary_difference

    saved = run / "model"
    if not (saved / "tokenizer_config.json").is_file():
        return  # a run without its model folder (stopped early): its own tokenizer is not at hand
    problem = vocabulary_difference(AutoTokenizer.from_pretrained(saved), tokenizer)
    if problem:
        raise PruneError(f"{src} does not use the tokenizer of the run {run} whose rows score and calibrate it "
                         f"({problem}); pass --run with a run of this model's tokenizer")


# ------------------------------------------------------------------ layout
def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers, refused unless every one has the Llama/Qwen2/Mistral projections."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise PruneError(f"{type(model).__name__}: no decoder layers at model.layers; fttrain prune handles the "
                         "Llama, Qwen2 and Mistral layout")
    missing = sorted({f"{part}.{name}" for layer in layers for part, names in (("self_attn", ATTENTION), ("mlp", MLP))
                      for name in names
                      if not isinstance(getattr(getattr(layer, part, None), name, None), torch.nn.Linear)})
    if missing:
        raise PruneError(f"{type(model).__name__}: its decoder layers have no Linear {', '.join(missing)}; fttrain "
                         "prune handles the Llama, Qwen2 and Mistral layout (q/k/v/o_proj, gate/up/down_proj)")
    return layers


def layer_linears(layer) -> List[torch.nn.Linear]:
    return [getattr(layer.self_attn, n) for n in ATTENTION] + [getattr(layer.mlp, n) for n in MLP]


def prunable_weights(model) -> List[torch.nn.Parameter]:
    """What unstructured pruning touches: the decoder layers' Linear weights (not embeddings, head, norms)."""
    return [lin.weight for layer in decoder_layers(model) for lin in layer_linears(layer)]


def sparsity_of(model) -> float:
    """Fraction of zeros among the prunable weights."""
    weights = prunable_weights(model)
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def attention_shape(config) -> Dict[str, int]:
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"heads": heads, "kv_heads": kv, "per_group": heads // kv, "head_dim": head_dim}


# ------------------------------------------------------------ unstructured
@torch.no_grad()
def magnitude_prune(model, sparsity: float, scope: str) -> None:
    """Zero the ``sparsity`` fraction of smallest |w|: over all prunable weights together, or per matrix."""
    weights = prunable_weights(model)
    groups = [weights] if scope == "global" else [[w] for w in weights]
    for group in groups:
        # Global scope holds every prunable |w| at once (about 12 bytes per weight with topk's indices).
        flat = torch.cat([w.detach().abs().flatten().float() for w in group])
        # topk picks exactly round(S * n) weights even when magnitudes tie, so the sparsity is the target's.
        drop = torch.topk(flat, round(sparsity * flat.numel()), largest=False, sorted=False).indices
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[drop] = False
        start = 0
        for w in group:
            w.masked_fill_(~keep[start:start + w.numel()].view_as(w), 0)
            start += w.numel()


# -------------------------------------------------------------- structured
def training_rows(run: Path, eval_split: str):
    """The run's training split, from the preparation its eval split (compare's rebuild) was opened from."""
    from fttrain.data.pipeline import PreparedData

    data = PreparedData.open(Path(eval_split).parent)
    if data.train is None:
        raise PruneError(f"{run}: its training rows are not prepared (data.streaming=true makes them as they are "
                         "read); --heads and --mlp-channels calibrate on them, so only --sparsity can prune it")
    return data.train.rows


def calibration_items(rows, count: int) -> List[Dict]:
    """``count`` training samples evenly spaced over the split (all of them when it has no more).

    Evenly spaced, not the first ``count``: a data file is often grouped by source or
    topic, and the first rows alone would rank heads and channels for that one part.
    Packed rows are unpacked into their samples (the eval split is scored the same way);
    pretraining blocks stay blocks.
    """
    blocks = rows.layout == "blocks"
    n = len(rows) if blocks else rows.num_samples
    picked = [k * n // count for k in range(count)] if count < n else list(range(n))
    return [rows[i] if blocks else {**rows.sample(i), "sample_ids": [i]} for i in picked]


@torch.no_grad()
def importance(model, items: List[Dict], pad_id: int, batch_size: int = 8) -> Dict[str, torch.Tensor]:
    """Per layer, how much each KV group and each MLP channel adds to the residual stream.

    A score is the mean over calibration tokens (padding excluded) of the norm of
    what the part writes into the residual stream: for a query head h,
    ||W_o[:, h] a_h|| (its attention output through its o_proj columns); for an MLP
    channel j, |act(gate_j) * up_j| * ||W_down[:, j]||. That is exactly the
    per-token change removing it makes to the layer's output, so it ranks by
    what is lost, not by weight norms alone (a large weight that sees small
    activations matters little). A KV group scores the sum of its query heads.
    Returns {"heads": [layers, kv_heads], "channels": [layers, intermediate]}.
    """
    from fttrain.data.packing import PaddingCollator

    layers = decoder_layers(model)
    shape = attention_shape(model.config)
    heads = torch.zeros(len(layers), shape["heads"], dtype=torch.float64)
    channels = torch.zeros(len(layers), model.config.intermediate_size, dtype=torch.float64)
    current = {}  # the batch's real-token mask, read by the hooks

    def attention_hook(i):
        def hook(module, args):
            x = args[0][current["mask"]].float()  # [tokens, heads * head_dim]
            w = module.weight.float()
            d = shape["head_dim"]
            for h in range(shape["heads"]):
                heads[i, h] += (x[:, h * d:(h + 1) * d] @ w[:, h * d:(h + 1) * d].T).norm(dim=-1).sum().double()
        return hook

    def mlp_hook(i):
        def hook(module, args):
            x = args[0][current["mask"]].float()  # [tokens, intermediate]: act(gate) * up
            channels[i] += (x.abs().sum(0) * module.weight.float().norm(dim=0)).double()
        return hook

    handles = [h for i, layer in enumerate(layers)
               for h in (layer.self_attn.o_proj.register_forward_pre_hook(attention_hook(i)),
                         layer.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)))]
    collate, tokens, device = PaddingCollator(pad_id), 0, next(model.parameters()).device
    try:
        for start in range(0, len(items), batch_size):
            batch = collate(items[start:start + batch_size])
            current["mask"] = batch["attention_mask"].bool().to(device)
            tokens += int(current["mask"].sum())
            model(input_ids=batch["input_ids"].to(device), attention_mask=current["mask"].long(), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    groups = heads.view(len(layers), shape["kv_heads"], shape["per_group"]).sum(-1)
    return {"heads": groups / max(tokens, 1), "channels": channels / max(tokens, 1)}


def least_important(scores: torch.Tensor, remove: int) -> List[List[int]]:
    """Per layer (row), the indices of its ``remove`` lowest scores, ascending."""
    if remove == 0:
        return [[] for _ in range(scores.shape[0])]
    return scores.topk(remove, dim=1, largest=False).indices.sort(dim=1).values.tolist()


def kept(total: int, removed: List[int], width: int = 1) -> torch.Tensor:
    """Row/column indices left when the blocks ``removed`` (each ``width`` wide) go."""
    return torch.tensor([b * width + j for b in range(total) if b not in removed for j in range(width)])


@torch.no_grad()
def shrink(model, removed_groups: List[List[int]], removed_channels: List[List[int]]):
    """A smaller model of the same class without the removed KV groups and MLP channels.

    Per layer, with d = head_dim and g = query heads per KV group, removing group k means:
        q_proj rows     [k*g*d, (k+1)*g*d)   (its g query heads)      + their bias
        k_proj, v_proj rows [k*d, (k+1)*d)   (its KV head)            + their bias
        o_proj columns  [k*g*d, (k+1)*g*d)   (the query heads' outputs)
    and removing channel j: gate_proj and up_proj row j (+ bias), down_proj column j.
    """
    from transformers import AutoModelForCausalLM

    config, shape = model.config, attention_shape(model.config)
    d, g = shape["head_dim"], shape["per_group"]
    state = model.state_dict()
    for i, (groups, chans) in enumerate(zip(removed_groups, removed_channels)):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        q_rows, kv_rows = kept(shape["kv_heads"], groups, g * d), kept(shape["kv_heads"], groups, d)
        ch = kept(config.intermediate_size, chans)
        cuts = [(attn + "q_proj", 0, q_rows), (attn + "k_proj", 0, kv_rows), (attn + "v_proj", 0, kv_rows),
                (attn + "o_proj", 1, q_rows), (mlp + "gate_proj", 0, ch), (mlp + "up_proj", 0, ch),
                (mlp + "down_proj", 1, ch)]
        for name, dim, index in cuts:
            state[f"{name}.weight"] = state[f"{name}.weight"].index_select(dim, index)
            if dim == 0 and f"{name}.bias" in state:  # a bias follows its output rows; o_proj's and down_proj's stay
                state[f"{name}.bias"] = state[f"{name}.bias"].index_select(0, index)
    small = copy.deepcopy(config)
    small.num_key_value_heads = shape["kv_heads"] - len(removed_groups[0])
    small.num_attention_heads = small.num_key_value_heads * g
    small.head_dim = d  # explicit: hidden_size / num_attention_heads is no longer the head size
    small.intermediate_size = config.intermediate_size - len(removed_channels[0])
    dtype = next(model.parameters()).dtype
    pruned = AutoModelForCausalLM.from_config(small, dtype=dtype)
    pruned.load_state_dict(state, strict=True)
    # from_config writes a default generation config: keep the source's (its end-of-turn
    # eos list, sampling defaults), or the pruned instruct model would generate past <|eot_id|>.
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.eval()


# ------------------------------------------------------------------ report
def describe(model, size_bytes: Optional[int], quality: Dict) -> Dict:
    return {"params": sum(p.numel() for p in model.parameters()), "sparsity": sparsity_of(model),
            "size_bytes": size_bytes, **quality}


def table(report: Dict) -> str:
    def size(row):
        return "-" if row["size_bytes"] is None else f"{row['size_bytes'] / MiB:.2f}"

    lines = [f"eval: {report['eval_rows']} rows ({report['eval_tokens']} trained tokens) of the eval split of "
             f"{report['run']}", "",
             "| model | params | sparsity (decoder Linear weights) | size (MiB) | eval loss | perplexity |", "|---|---|---|---|---|---|"]
    if "structured" in report:
        lines[1:1] = [f"calibration: {report['structured']['calibration_rows']} samples of the "
                      f"{report['structured']['calibration_split']} split"]
    for name in ("source", "pruned"):
        r = report[name]
        lines.append(f"| {name} | {r['params']:,} | {r['sparsity']:.3f} | {size(r)} | {r['eval_loss']:.4f} | "
                     f"{r['perplexity']:.2f} |")
    return "\n".join(lines + ["", f"recover: {report['recover_command']}"]) + "\n"


def recover_command(run: Path, out: Path) -> str:
    """A normal fttrain run on the pruned folder, with the source run's experiment and data, so its
    eval split is the rows the report scored."""
    from omegaconf import OmegaConf

    overrides = list(OmegaConf.load(run / "overrides.yaml")) if (run / "overrides.yaml").exists() else []
    exp = next((o for o in overrides if o.startswith("+exp=")), "+exp=tiny_sft")
    same_data = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] in ("data", "task")]
    return shlex.join(["python", "-m", "fttrain", exp, *same_data, "model=local",
                       f"model.name_or_path={out.resolve()}", f"name={out.name}_recover"])


# ------------------------------------------------------------------ prune
def check_amounts(sparsity: Optional[float], scope: str, heads: int, mlp_channels: int, calibration_rows: int,
                  eval_rows: Optional[int]) -> None:
    if sparsity is not None and not 0 <= sparsity < 1:
        raise PruneError(f"--sparsity {sparsity}: must be in [0, 1) (the fraction of weights set to zero)")
    if scope not in SCOPES:
        raise PruneError(f"--scope {scope}: one of {', '.join(SCOPES)}")
    for flag, value in (("--heads", heads), ("--mlp-channels", mlp_channels)):
        if value < 0:
            raise PruneError(f"{flag} {value}: a count removed per layer, at least 0")
    for flag, value in (("--calibration-rows", calibration_rows), ("--eval-rows", eval_rows)):
        if value is not None and value < 1:  # --eval-rows unset: every eval row
            raise PruneError(f"{flag} {value}: at least 1")
    if not sparsity and not heads and not mlp_channels:
        raise PruneError("nothing to prune: give --sparsity S (0 < S < 1), --heads K or --mlp-channels N")


def check_structure(config, heads: int, mlp_channels: int) -> None:
    shape = attention_shape(config)
    if heads >= shape["kv_heads"]:
        what = "KV groups (num_key_value_heads)" if shape["per_group"] > 1 else "heads"
        raise PruneError(f"--heads {heads}: each layer has {shape['kv_heads']} {what}; at most "
                         f"{shape['kv_heads'] - 1} can be removed")
    if mlp_channels >= config.intermediate_size:
        raise PruneError(f"--mlp-channels {mlp_channels}: each layer has {config.intermediate_size} "
                         f"(intermediate_size); at most {config.intermediate_size - 1} can be removed")


def prune(src, out, sparsity: Optional[float] = None, scope: str = "global", heads: int = 0, mlp_channels: int = 0,
          run: Optional[str] = None, calibration_rows: int = 8, eval_rows: Optional[int] = None, dtype: str = "fp32",
          overwrite: bool = False) -> Dict:
    """Prune SRC into ``out``; returns the report written there as prune_report.json."""
    from fttrain.compare import eval_set, quality, weight_bytes
    from fttrain.data.store import PreparedRows
    from fttrain.models.load import load_causal_lm, DTYPES

    check_amounts(sparsity, scope, heads, mlp_channels, calibration_rows, eval_rows)
    out = Path(out)
    if out.exists() and not overwrite:
        raise PruneError(f"--out {out} exists; pass --overwrite to replace it")
    source = load_source(src, run, dtype)
    decoder_layers(source.model)  # refuses another layout before any work
    check_structure(source.model.config, heads, mlp_channels)
    eval_split = eval_set(source.run)["split"]
    rows = PreparedRows(eval_split)
    pad_id, device = source.tokenizer.pad_token_id, "cpu"
    report = {"source_path": str(source.folder), "source_kind": source.kind, "run": str(source.run), "dtype": dtype,
              "source": describe(source.model, source.size_bytes,
                                 quality(source.model, rows, pad_id, device, eval_rows))}
    model = source.model
    if heads or mlp_channels:
        train = training_rows(source.run, eval_split)
        calibration = calibration_items(train, calibration_rows)
        scores = importance(model, calibration, pad_id)
        groups, chans = least_important(scores["heads"], heads), least_important(scores["channels"], mlp_channels)
        model = shrink(model, groups, chans)
        report["structured"] = {"removed_kv_groups": groups, "removed_mlp_channels": chans,
                                "calibration_split": "train", "calibration_rows": len(calibration),
                                **{k: getattr(model.config, k) for k in ("num_attention_heads", "num_key_value_heads",
                                                                          "head_dim", "intermediate_size")}}
    if sparsity:
        magnitude_prune(model, sparsity, scope)
        report["unstructured"] = {"target_sparsity": sparsity, "scope": scope}

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        source.tokenizer.save_pretrained(tmp)
        del model, source
        # Scored as plain transformers loads it from disk: what the report says is what DIR holds.
        reloaded = load_causal_lm(str(tmp), DTYPES[dtype]).eval()
        report["pruned"] = describe(reloaded, weight_bytes(tmp),
                                    quality(reloaded, rows, pad_id, device, eval_rows))
        report.update(eval_rows=report["pruned"]["eval_rows"], eval_tokens=report["pruned"]["eval_tokens"],
                      recover_command=recover_command(Path(report["run"]), out))
        atomic.write_json(tmp / "prune_report.json", report)
    except BaseException:  # a half-written DIR.tmp is never left to be mistaken for a result
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.publish_dir(tmp, out)
    return report


# -------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    from fttrain.models.load import DTYPES

    parser = argparse.ArgumentParser(prog="fttrain prune", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("src", help="run directory, export or model folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the pruned model")
    parser.add_argument("--sparsity", type=float, help="fraction of decoder Linear weights set to zero, in [0, 1)")
    parser.add_argument("--scope", default="global", choices=SCOPES, help="global: one ranking over all weights; layer: per matrix")
    parser.add_argument("--heads", type=int, default=0, help="KV groups (or heads, without GQA) removed per layer")
    parser.add_argument("--mlp-channels", type=int, default=0, help="MLP intermediate channels removed per layer")
    parser.add_argument("--run", help="the run whose training split calibrates and eval split scores (needed for a "
                        "plain folder)")
    parser.add_argument("--calibration-rows", type=int, default=8,
                        help="training samples, evenly spaced over the split, that rank heads and channels")
    parser.add_argument("--eval-rows", type=int, help="score the first N eval samples (default: all)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the pruned weights")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        report = prune(args.src, args.out, args.sparsity, args.scope, args.heads, args.mlp_channels, args.run,
                       args.calibration_rows, args.eval_rows, args.dtype, args.overwrite)
    except FttrainError as e:
        return errors.report("fttrain prune", e)
    print(table(report))
    print(f"written to {args.out}: the pruned model and prune_report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
