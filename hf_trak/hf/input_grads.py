"""The forward hooks that make the input embeddings require grad, taken off while ``vmap`` runs over the model.

Fine-tuning with adapters and gradient checkpointing (``Trainer`` with ``gradient_checkpointing=True`` on a PEFT
model, peft's ``prepare_model_for_kbit_training``, or a user's ``enable_input_require_grads()``) hooks the input
embeddings: ``output.requires_grad_(True)``, which ``torch.func.vmap`` refuses. hf_trak's functional passes need
no such flag (they differentiate the weights they are given), so the hooks are taken off for the pass and put
back after, in their order. They are found by their function's name in transformers and peft (a copied model's
handles would remove the original's hooks, not its own).
"""

import contextlib
from collections import OrderedDict

from torch import nn

HOOK_NAMES = {"make_inputs_require_grads", "make_inputs_require_grad"}  # transformers', peft's


@contextlib.contextmanager
def input_require_grads_off(model: nn.Module):
    """Within the block, no module of ``model`` runs a forward hook that makes its output require grad."""
    taken = []
    for module in model.modules():
        hooks = module._forward_hooks
        kept = OrderedDict((key, f) for key, f in hooks.items() if getattr(f, "__name__", "") not in HOOK_NAMES)
        if len(kept) < len(hooks):
            taken.append((module, OrderedDict(hooks)))
            hooks.clear()
            hooks.update(kept)
    try:
        yield
    finally:
        for module, hooks in taken:
            module._forward_hooks.clear()
            module._forward_hooks.update(hooks)
