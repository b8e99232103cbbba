"""Where the repeated blocks, embeddings and head of a transformers model are.

Freeze, LISA and the bottleneck adapters all work per layer; this finds the
layers the same way for Llama-family decoders and BERT-family encoders.
"""

from __future__ import annotations

from typing import List, Tuple

import torch


def transformer_layers(model) -> List[Tuple[str, torch.nn.Module]]:
    """(name, module) of each repeated block, in order.

    The block class is the model's own ``_no_split_modules`` entry that
    occurs more than once (LlamaDecoderLayer, BertLayer, ...); failing that,
    the longest ModuleList.
    """
    classes = set(getattr(model, "_no_split_modules", None) or [])
    by_class = {}
    for n, m in model.named_modules():
        if type(m).__name__ in classes:
            by_class.setdefault(type(m).__name__, []).append((n, m))
    found = max(by_class.values(), key=len, default=[])  # BertEmbeddings is listed too, once
    if len(found) > 1:
        return found
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no repeated transformer layers found")
    name, longest = max(lists, key=lambda x: len(x[1]))
    return [(f"{name}.{i}", m) for i, m in enumerate(longest)]


def _param_names_of(model, module) -> List[str]:
    if module is None:
        return []
    ids = {id(p) for p in module.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def embedding_param_names(model) -> List[str]:
    return _param_names_of(model, model.get_input_embeddings())


# Task heads of transformers' models (classification, token classification, QA),
# found by name when the model does not expose them as output embeddings.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def head_module_names(model) -> List[str]:
    """The output head's module names: the output embeddings (lm_head) or a
    task head (classifier, score, qa_outputs). Adapters never target these."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules()
            if (head is not None and m is head) or n.rsplit(".", 1)[-1] in HEAD_NAMES]


def head_param_names(model) -> List[str]:
    """Parameters of the output head. Empty when tied to the embeddings."""
    modules = dict(model.named_modules())
    names = [n for head in head_module_names(model) for n in _param_names_of(model, modules[head])]
    embeddings = set(embedding_param_names(model))
    return [n for n in dict.fromkeys(names) if n not in embeddings]


def layer_param_names(model) -> List[List[str]]:
    """Parameter names of each transformer layer, by layer index."""
    return [[f"{name}.{pn}" for pn, _ in module.named_parameters()] for name, module in transformer_layers(model)]
