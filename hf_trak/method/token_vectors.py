"""The tokens' vectors of a factorable layer's gradient G = Σ_t u_t v_tᵀ (``hf_trak.method.factored``).

For ``nn.Linear`` (W: d_out × d_in) u = δ (output gradient), v = x (input); for ``Conv1D`` u = x, v = δ; for
``nn.Embedding`` u = one-hot(id), v = δ (rows at ``padding_idx`` get none).
"""

import torch
from torch import Tensor, nn


def reaching_tokens(delta: Tensor) -> Tensor:
    """(B·T,) bool: the tokens whose output gradient δ_t (B, T, d_out) is not all zero. The others (padding, a
    causal LM's last position) add nothing to any example's gradient Σ_t u_t v_tᵀ, so the Kronecker factors
    leave them out too (their input-side u or v is not zero)."""
    return (delta != 0).any(dim=-1).reshape(-1)


def id_counts(module: nn.Embedding, ids: Tensor) -> Tensor:
    """How many of the tokens ``ids`` (flat) have each id (the padding id's none): (num_embeddings,)."""
    if module.padding_idx is not None:
        ids = ids[ids != module.padding_idx]
    return torch.bincount(ids, minlength=module.num_embeddings)


def side_vectors(module: nn.Module, inputs: Tensor, delta: Tensor, side: str) -> Tensor:
    """The tokens' u_t ("rows"; not an embedding's) or v_t ("cols") of G = Σ_t u_t v_tᵀ, unprojected: (B·T, d)."""
    if isinstance(module, nn.Embedding):
        return delta.reshape(-1, delta.shape[-1])
    x = inputs.float().reshape(delta.shape[0], -1, inputs.shape[-1])
    vectors = delta if side == ("rows" if isinstance(module, nn.Linear) else "cols") else x
    return vectors.reshape(-1, vectors.shape[-1])


def projected_pair(module: nn.Module, inputs: Tensor, delta: Tensor, rows: Tensor, cols: Tensor):
    """(P_rᵀ u_t, P_cᵀ v_t) for every token, each (B, T, k), where G = Σ_t u_t v_tᵀ."""
    batch_size = delta.shape[0]
    if isinstance(module, nn.Embedding):
        ids = inputs.reshape(batch_size, -1)
        u = rows[ids]  # P_rᵀ one-hot(id) is row ``id`` of P_r
        if module.padding_idx is not None:
            u = u * (ids != module.padding_idx).unsqueeze(-1)
        return u, delta @ cols
    x = inputs.float().reshape(batch_size, -1, inputs.shape[-1])
    if isinstance(module, nn.Linear):
        return delta @ rows, x @ cols
    return x @ rows, delta @ cols
