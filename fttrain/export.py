"""Export a run's adapter as a standalone model, behind a quality gate.

    python -m fttrain.export RUN_DIR [--out DIR] [--dtype fp32|bf16|fp16] [--tolerance T]
    python -m fttrain.export --adapter a=RUN_A --adapter b=RUN_B --weights a=0.7,b=0.3 --out DIR
    python -m fttrain.export RUN_DIR --no-merge --out DIR --push-to-hub user/name [--private]

1. Load the base and the adapter as trained (a QLoRA base in 4/8-bit, as in
   training) and record its logits on held-out inputs (the run's eval
   prompts from samples.jsonl, plus seeded random token sequences).
2. Merge. QLoRA: the quantised base weights are first dequantised to
   ``--dtype`` and the adapter is merged there, never into 4-bit weights
   (re-quantising a merged weight moved logits by up to 0.7 on the tiny test model). The
   gate then compares against the adapter on the dequantised base; the gap
   to the quantised model as trained is reported (0 for 4-bit up to float
   rounding; LLM.int8 also quantises activations, so 8-bit differs a little).
   ``--qlora-base original`` instead merges into the original 16-bit base
   (what most tools do; the result differs from the model that trained by
   the quantisation error, which the report states).
3. Save to ``DIR.tmp`` as safetensors with the tokenizer, reload it with
   plain ``AutoModelForCausalLM`` and compare its logits with step 1's. Only
   if the largest difference is within the tolerance is ``DIR.tmp`` renamed
   to ``DIR``; otherwise it is deleted and the export fails. ``DIR`` holds
   ``export_report.json`` with the measured differences.

Prompt, prefix and P-tuning, LLaMA-Adapter and bottleneck adapters cannot be
folded into weights; export says so, and ``--keep-unmerged`` copies the
adapter folder as is. Several LoRA adapters can be combined with peft's
``add_weighted_adapter`` (``--weights``, ``--combination``) and exported the
same way. ``--no-merge`` exports the adapter as trained, loadable with plain
peft from any folder.

Every export writes a model card (``README.md``: base, method, data, metrics,
command, versions; fttrain/model_card.py). ``--push-to-hub REPO`` uploads the
exported folder with huggingface_hub; offline or without a token it refuses
before doing any work.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from fttrain import errors
from fttrain.errors import FttrainError
from fttrain.methods import METHODS
from fttrain.models.adapted import adapter_method, load_for_inference, model_folder, run_dir_of
from fttrain.models.load import DTYPES, load_causal_lm
from fttrain.atomic import publish_dir
from fttrain.model_card import hub_problem, push, write_card

log = logging.getLogger("fttrain.export")
# Largest |logit difference| accepted per dtype: merging changes the order of
# floating-point operations (W x + B A x versus (W + B A) x), nothing more.
DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 1.5e-1}


class ExportError(FttrainError, RuntimeError):
    pass


# ------------------------------------------------------------ gate inputs
def gate_inputs(tokenizer, folder: Path, n: int = 8, seed: int = 0, length: int = 32) -> List[torch.Tensor]:
    """Held-out prompts with their references from the run's samples.jsonl,
    then seeded random token sequences up to n inputs."""
    texts = []
    samples = folder.parent / "samples.jsonl"
    if samples.exists():
        for line in samples.read_text().splitlines():
            row = json.loads(line)
            prompt = row.get("prompt")
            if isinstance(prompt, list) and getattr(tokenizer, "chat_template", None):
                ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
                ids = ids + tokenizer(str(row.get("reference", "")), add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer(f"{prompt}{row.get('reference', '')}")["input_ids"]
            texts.append(torch.tensor([ids]))
    g = torch.Generator().manual_seed(seed)
    while len(texts) < n:
        texts.append(torch.randint(0, len(tokenizer), (1, length), generator=g))
    return texts[:n]


@torch.no_grad()
def logits_of(model, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=x.to(device)).logits.float().cpu() for x in inputs]


def compare(ref: List[torch.Tensor], got: List[torch.Tensor]) -> dict:
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    mean = sum(float((a - b).abs().mean()) for a, b in zip(ref, got)) / len(ref)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, got))
    total = sum(a.shape[0] * a.shape[1] for a in ref)
    return {"max_abs_logit_diff": diff, "mean_abs_logit_diff": mean, "argmax_agreement": agree / total}


# ---------------------------------------------------------------- merging
def dequantized_weights(model) -> Dict[str, torch.Tensor]:
    """The dequantised weight of every bitsandbytes 4/8-bit Linear, keyed by
    its name in the plain transformers model (peft's prefixes and LoRA's
    ``base_layer`` removed)."""
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear8bitLt):
            weight = dequantize_bnb_weight(mod.weight, state=mod.state)
        elif isinstance(mod, bnb.nn.Linear4bit):
            weight = dequantize_bnb_weight(mod.weight, state=mod.weight.quant_state)
        else:
            continue
        clean = name.removeprefix("base_model.model.").replace(".base_layer", "")
        out[f"{clean}.weight"] = weight.detach().cpu()
    return out


def dequantized_base(quantized_model, base_path: str, dtype: torch.dtype):
    """The base in ``dtype`` carrying the exact weights the adapter trained
    against: the quantised layers dequantised, everything else (embeddings,
    norms, head, which QLoRA does not quantise) as in the original."""
    weights = dequantized_weights(quantized_model)
    base = load_causal_lm(base_path, dtype)
    state = base.state_dict()
    missing = [k for k in weights if k not in state]
    if missing:
        raise ExportError(f"dequantised weights do not fit {base_path}: {missing[:3]}")
    for key, value in weights.items():
        if value.shape != state[key].shape:
            raise ExportError(f"{key}: dequantised shape {tuple(value.shape)} != base {tuple(state[key].shape)}")
    base.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
    return base, len(weights)


def merge_adapter(model):
    """peft's merge into the base weights; returns the plain transformers model."""
    return model.merge_and_unload(safe_merge=True)


def _publish(model, tokenizer, out: Path, ref_logits, inputs, tolerance: float, report: dict, dtype) -> dict:
    """Save to out.tmp, reload with plain transformers, gate, then rename."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.config.use_cache = True
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    del model
    reloaded = load_causal_lm(str(tmp), dtype)
    gate = compare(ref_logits, logits_of(reloaded, inputs))
    report = {**report, **gate, "tolerance": tolerance, "gate_inputs": len(inputs)}
    if not gate["max_abs_logit_diff"] <= tolerance:  # also catches NaN
        shutil.rmtree(tmp)
        raise ExportError(
            f"quality gate failed: the merged model's logits differ from the adapter model's by up to "
            f"{gate['max_abs_logit_diff']:.4g} (tolerance {tolerance:g}; argmax agreement "
            f"{gate['argmax_agreement']:.3f}); nothing was written to {out}"
        )
    (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_card(tmp, run_dir_of(Path(report["adapter"])) if "adapter" in report else None, report)
    publish_dir(tmp, out)
    return report


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")


def export_merged(path, out, base: Optional[str] = None, dtype: str = "fp32", qlora_base: str = "dequantized",
                  tolerance: Optional[float] = None, n_inputs: int = 8, keep_unmerged: bool = False,
                  overwrite: bool = False, no_merge: bool = False) -> dict:
    folder = model_folder(path)
    out = Path(out)
    _check_out(out, overwrite)
    method = adapter_method(folder)
    declared = METHODS.get(method)
    if declared is not None and declared.merge_note and not (keep_unmerged or no_merge):
        raise ExportError(
            f"peft={method} cannot be merged into the base weights: {declared.merge_note}. Use the adapter with "
            f"its base (python -m fttrain.generate {path}), or pass --keep-unmerged to export the adapter as is"
        )
    if no_merge or (declared is not None and declared.merge_note):
        # The adapter as trained, with its tokenizer and a card: loadable with plain peft from any folder.
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(folder, tmp)
        report = {"method": method, "merged": False, "adapter": str(folder)}
        write_card(tmp, run_dir_of(folder), report)
        publish_dir(tmp, out)
        log.warning("peft=%s kept unmerged: %s holds the adapter; load it on its base", method, out)
        return report
    if (folder / "config.json").exists() and not (folder / "adapter_config.json").exists():
        raise ExportError(f"{folder} is already a whole model (peft={method}): nothing to merge; "
                          "load it with AutoModelForCausalLM.from_pretrained")

    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    torch_dtype = DTYPES[dtype]
    original = declared is not None and declared.quantized_base and qlora_base == "original"
    loaded = load_for_inference(folder, base=base, dtype=dtype, quantized=False if original else None)
    inputs = gate_inputs(loaded.tokenizer, folder, n_inputs)
    ref = logits_of(loaded.model, inputs)
    report = {"method": method, "merged": True, "dtype": dtype, "base": loaded.base_path, "adapter": str(folder)}
    model = loaded.model
    if loaded.quantized:
        from peft import PeftModel

        base_model, report["dequantized_layers"] = dequantized_base(model, loaded.base_path, torch_dtype)
        del model, loaded.model
        model = PeftModel.from_pretrained(base_model, str(folder))
        report["merged_into"] = "dequantized 4/8-bit base (the weights the adapter trained against)"
        # The gate checks the merge on the dequantised base; how far that is
        # from the quantised model as trained is reported (LLM.int8 also
        # quantises activations, so 8-bit is never matched exactly).
        trained, ref = ref, logits_of(model, inputs)
        report["quantized_forward_gap"] = compare(trained, ref)["max_abs_logit_diff"]
    elif original:
        report["merged_into"] = "original 16-bit base (differs from the trained 4-bit base by its quantisation error)"
    merged = merge_adapter(model)
    return _publish(merged, loaded.tokenizer, out, ref, inputs, tolerance, report, torch_dtype)


def export_weighted(adapters: Dict[str, str], weights: Dict[str, float], out, combination: str = "linear",
                    base: Optional[str] = None, dtype: str = "fp32", tolerance: Optional[float] = None,
                    n_inputs: int = 8, overwrite: bool = False, density: Optional[float] = None) -> dict:
    """Combine several LoRA adapters on one base into one, merge and export."""
    out = Path(out)
    _check_out(out, overwrite)
    if set(weights) != set(adapters):
        raise ExportError(f"--weights names {sorted(weights)} must match the --adapter names {sorted(adapters)}")
    names = list(adapters)
    first, rest = adapters[names[0]], {n: adapters[n] for n in names[1:]}
    loaded = load_for_inference(first, base=base, dtype=dtype, quantized=False, extra_adapters=rest)
    model = loaded.model
    # load_for_inference names the first adapter "default", the others by their own names.
    loaded_names = ["default"] + names[1:]
    kwargs = {"density": density} if density is not None else {}
    model.add_weighted_adapter(loaded_names, [weights[n] for n in names], adapter_name="combined",
                               combination_type=combination, **kwargs)
    model.set_adapter("combined")
    for name in loaded_names:
        model.delete_adapter(name)
    inputs = gate_inputs(loaded.tokenizer, model_folder(first), n_inputs)
    ref = logits_of(model, inputs)
    report = {"method": "weighted", "combination": combination, "weights": weights,
              "adapters": {n: str(model_folder(p)) for n, p in adapters.items()}, "dtype": dtype,
              "base": loaded.base_path}
    merged = merge_adapter(model)
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    return _publish(merged, loaded.tokenizer, out, ref, inputs, tolerance, report, DTYPES[dtype])


# -------------------------------------------------------------------- CLI
def _pairs(items, what: str) -> Dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ExportError(f"{what} {item!r}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fttrain.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("path", nargs="?", help="run directory or adapter folder")
    parser.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/merged)")
    parser.add_argument("--base", help="base model (default: the one the adapter names)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the merged weights")
    parser.add_argument("--qlora-base", choices=("dequantized", "original"), default="dequantized")
    parser.add_argument("--tolerance", type=float, help=f"largest |logit difference| accepted (default {DEFAULT_TOLERANCE})")
    parser.add_argument("--gate-inputs", type=int, default=8, help="held-out inputs the gate compares on")
    parser.add_argument("--keep-unmerged", action="store_true", help="copy adapters that cannot be merged as they are")
    parser.add_argument("--no-merge", action="store_true",
                        help="export the adapter as trained (with tokenizer and model card), merging nothing")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the exported folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="an adapter to combine (repeat); needs --weights")
    parser.add_argument("--weights", help="NAME=W,NAME=W: weights of the combined adapters")
    parser.add_argument("--combination", default="linear",
                        help="peft add_weighted_adapter combination: linear, cat, svd, ties, dare_linear, ...")
    parser.add_argument("--density", type=float, help="for ties/dare combinations: the fraction of weights kept")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.push_to_hub and hub_problem():  # before any work: an upload that cannot happen is said first
            raise ExportError(hub_problem())
        if args.adapter:
            adapters = _pairs(args.adapter, "--adapter")
            if not args.weights or not args.out:
                raise ExportError("combining adapters needs --weights NAME=W,... and --out DIR")
            weights = {k: float(v) for k, v in _pairs(args.weights.split(","), "--weights").items()}
            report = export_weighted(adapters, weights, args.out, args.combination, args.base, args.dtype,
                                     args.tolerance, args.gate_inputs, args.overwrite, args.density)
            out = args.out
        else:
            if not args.path:
                raise ExportError("give a run directory or adapter folder (or --adapter NAME=PATH ...)")
            folder = model_folder(args.path)
            out = args.out or (folder.parent / "merged" if folder.name == "model" else Path(f"{folder}_merged"))
            report = export_merged(args.path, out, args.base, args.dtype, args.qlora_base, args.tolerance,
                                   args.gate_inputs, args.keep_unmerged, args.overwrite, args.no_merge)
        if report.get("merged", True):
            print(f"exported to {out}: max |logit diff| {report['max_abs_logit_diff']:.3g} "
                  f"(tolerance {report['tolerance']:g}), argmax agreement {report['argmax_agreement']:.3f}")
        else:
            print(f"adapter kept unmerged in {out}")
        if args.push_to_hub:
            print(f"uploaded {out} to {push(Path(out), args.push_to_hub, args.private)}")
    except FttrainError as e:
        return errors.report("fttrain.export", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
