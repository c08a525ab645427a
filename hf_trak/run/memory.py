"""The batch size that fits the memory at hand, when ``batch_size`` is left to hf_trak (None).

A featurization's memory grows with the batch by about the memory of one example's forward and backward
pass, kept for the backward and for the factored projector's hooks. ``example_bytes`` estimates it, in
float32, from the longest sequence T, the model's width h, depth L, attention heads a and output size V
(the vocabulary of a causal LM), and the projected layers:

    bytes ≈ 4 · T · (L · (ACTIVATIONS · h + ATTENTION · a · T) + LOGITS · V + Σ_layers (d_in + d_out + k_r + k_c))

(plus, for the dense projector, two chunks of per-example gradients). ``auto_batch_size`` takes as many
examples as fit ``MEMORY_SHARE`` of the memory free now (the GPU's, or the machine's available RAM), at
least 1 and at most ``MAX_BATCH``; on a CPU also at most ``MAX_CPU_TOKENS`` tokens, past which a larger
batch costs memory and gains no speed (the docs' benchmarks, "Causal LMs"). The constants are upper bounds
measured on GPT-2 small and BERT (``benchmarks/llm_cost.py`` prints the peak memory a run reached).
"""

import logging
from typing import Optional

import psutil
import torch
from torch import nn

from hf_trak.method.model_outputs import CausalLMModelOutput

logger = logging.getLogger(__name__)

ACTIVATIONS, ATTENTION, LOGITS = 20, 3, 3  # floats per token: per layer × h, per layer × a × T, × V
MEMORY_SHARE, MAX_BATCH = 0.5, 32
MAX_CPU_TOKENS = 2048  # per batch, on a CPU


def _config_value(config, names, default: int) -> int:
    for holder in (config, getattr(config, "text_config", None)):
        for name in names:
            value = getattr(holder, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return default


def example_bytes(model: nn.Module, length: int, projector=None, output_size: Optional[int] = None) -> int:
    """The estimate above for one example of ``length`` tokens (1 for inputs without a sequence)."""
    config = getattr(model, "config", None)
    hidden = _config_value(config, ("hidden_size", "n_embd", "d_model"), 256)
    layers = _config_value(config, ("num_hidden_layers", "n_layer", "num_layers"), 1)
    heads = _config_value(config, ("num_attention_heads", "n_head"), 1)
    tokens = max(int(length), 1)
    floats = tokens * (layers * (ACTIVATIONS * hidden + ATTENTION * heads * tokens) + LOGITS * (output_size or 1))
    for use in getattr(projector, "uses", []):
        weight = use.module.weight
        floats += tokens * (weight.shape[-1] if isinstance(use.module, nn.Embedding) else sum(weight.shape))
    for target in getattr(projector, "targets", []):
        floats += tokens * (target.k_rows + target.k_cols)
    chunks = getattr(getattr(projector, "gradients", None), "chunks", None)
    if chunks:  # the dense projector: per-example gradients of one chunk, and their projection's input
        numels = {name: parameter.numel() for name, parameter in model.named_parameters()}
        floats += 2 * max(sum(numels.get(name, 0) for name in chunk) for chunk in chunks)
    return 4 * floats


def available_bytes(device: torch.device) -> int:
    """Free memory now: the GPU's (``torch.cuda.mem_get_info``) or the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def auto_batch_size(model: nn.Module, length: int, device: torch.device, projector=None, output_size=None) -> int:
    """As many examples of ``length`` tokens as fit ``MEMORY_SHARE`` of the free memory, in [1, ``MAX_BATCH``]
    (on a CPU: and at most ``MAX_CPU_TOKENS`` tokens)."""
    per_example, free = example_bytes(model, length, projector, output_size), available_bytes(device)
    most = MAX_BATCH if device.type != "cpu" else min(MAX_BATCH, MAX_CPU_TOKENS // max(int(length), 1))
    size = int(max(1, min(most, MEMORY_SHARE * free // per_example)))
    logger.info("batch_size=%d: %.2f GiB per example of %d tokens (estimated), %.1f GiB free", size,
                per_example / 2**30, length, free / 2**30)  # fmt: skip
    return size


def batch_size_for(feature_map, length: int) -> int:
    """``auto_batch_size`` for a ``FeatureMap``'s model, projector and device; a causal LM's output is its
    vocabulary."""
    config = getattr(feature_map.model, "config", None)
    is_lm = isinstance(feature_map.task, CausalLMModelOutput)
    output_size = _config_value(config, ("vocab_size",) if is_lm else ("num_labels",), 1)
    return auto_batch_size(feature_map.model, length, torch.device(feature_map.device), feature_map.projector,
                           output_size)  # fmt: skip
