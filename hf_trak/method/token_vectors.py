"""The tokens' vectors of a factorable layer's gradient G = Σ_t u_t v_tᵀ (``hf_trak.method.factored``).

For ``nn.Linear`` (W: d_out × d_in) u = δ (output gradient), v = x (input); for ``Conv1D`` u = x, v = δ; for
``nn.Embedding`` u = one-hot(id), v = δ (rows at ``padding_idx`` get none).

``token_features`` splits an example's projected gradient by position: x_i = Σ_t x_{i,t} + x_{i,pooled}, where
x_{i,t} sums the layers' (P_rᵀ u_t)(P_cᵀ v_t)ᵀ at position t and x_{i,pooled} the layers that see no
positions (a classifier's pooler and head, which read a pooled vector): the per-token scores of
``hf_trak.run.token_scores``.
"""

import math

import torch
from torch import Tensor, nn

from hf_trak.errors import InvalidArgumentError


def reaching_tokens(delta: Tensor) -> Tensor:
    """(B·T,) bool: the tokens whose output gradient δ_t (B, T, d_out) is not all zero. The others (padding, a
    causal LM's last position) add nothing to any example's gradient Σ_t u_t v_tᵀ, so the Kronecker factors
    leave them out too (their input-side u or v is not zero)."""
    return (delta.abs().amax(dim=-1) != 0).reshape(-1)  # a NaN reaches (NaN != 0), as in (δ != 0).any(-1)


def finite_examples(delta: Tensor, *others: Tensor) -> Tensor:
    """(B·T,) bool, for tokens shaped as ``delta`` (B × T × ...): those of the examples whose values in ``delta``
    and in each of ``others`` (B × ...) are all finite. An example with a NaN or an infinity anywhere (excluded
    from the store, ``on_nonfinite="exclude"``) adds none of its tokens to the statistics, not even its finite
    ones: a ViT's class token is finite at the first attention's input although the image's patches are NaN."""
    batch_size, length = delta.shape[:2]
    finite = torch.isfinite(delta.reshape(batch_size, -1)).all(dim=1)
    for tensor in others:
        finite &= torch.isfinite(tensor.reshape(batch_size, -1)).all(dim=1)
    return finite.repeat_interleave(length)


def finite_rows(rows: Tensor) -> Tensor:
    """``rows`` (n × d, as float32) without those that hold a NaN or an infinity (a copy only where one does)."""
    rows = rows.float()
    return rows if bool(torch.isfinite(rows.sum())) else rows[torch.isfinite(rows).all(dim=1)]


def finite_gram(rows: Tensor) -> Tensor:
    """rowsᵀ rows (float32) over the rows with finite values only (a row excluded for non-finite values adds
    nothing)."""
    rows = finite_rows(rows)
    return rows.T @ rows


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


GROUPED_CHUNK = 1 << 22  # values of the tokens' v_t v_tᵀ formed at once when an embedding's tokens are grouped


def token_gram(module: nn.Module, inputs: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Σ_t (u_t ⊗ v_t)(u_t ⊗ v_t)ᵀ over a batch's tokens (u: (B, T, k_r), v: (B, T, k_c)), float32, (k_r·k_c)²,
    tokens with a non-finite value left out: the per-token Gram matrix of a projected layer.

    An embedding's u_t is row id_t of P_r (0 for the padding id), so its tokens are grouped by id: the sum is
    Σ_id (a_id a_idᵀ) ⊗ C_id, C_id = Σ_{t: id_t = id} v_t v_tᵀ, in m·(k_r k_c)² + n·k_c² flops for m distinct ids among
    n tokens instead of n·(k_r k_c)² (a position embedding has as many ids as positions); where m ≤ n/2 and the
    C_id take no more memory than the tokens' rows (m·k_c ≤ n·k_r)."""
    k_r, k_c = u.shape[-1], v.shape[-1]
    if isinstance(module, nn.Embedding):
        ids, tokens = inputs.reshape(-1), v.reshape(-1, k_c)
        keep = torch.isfinite(tokens).all(dim=1)
        if module.padding_idx is not None:
            keep &= ids != module.padding_idx
        unique, inverse = torch.unique(ids[keep], return_inverse=True)
        m, n = len(unique), int(keep.sum())
        if 2 * m <= n and m * k_c <= n * k_r:
            tokens = tokens[keep]
            a = torch.zeros(m, k_r, device=u.device).index_copy_(0, inverse, u.reshape(-1, k_r)[keep])  # any token's
            moments = torch.zeros(m, k_c * k_c, device=v.device)
            step = max(1, GROUPED_CHUNK // (k_c * k_c))
            for begin in range(0, n, step):
                chunk, where = tokens[begin : begin + step], inverse[begin : begin + step]
                moments.index_add_(0, where, (chunk[:, :, None] * chunk[:, None, :]).flatten(1))
            outer = (a[:, :, None] * a[:, None, :]).reshape(m, k_r * k_r)
            gram = (outer.T @ moments).reshape(k_r, k_r, k_c, k_c).permute(0, 2, 1, 3)
            return gram.reshape(k_r * k_c, k_r * k_c)
    return finite_gram(torch.einsum("btr,btc->btrc", u, v).reshape(-1, k_r * k_c))


def token_features(projector, task, weights, buffers, batch, model_id: int) -> Tensor:
    """(B, T + 1, k): x_{i,t} for each position t and, last, x_{i,pooled}, of a ``FactoredGradientProjector``'s
    features (which they sum to: one batched forward and backward)."""
    if projector.fallback_gradients is not None:
        raise InvalidArgumentError(
            "Per-token scores need every differentiated parameter in a Linear, Conv1D or Embedding layer: "
            "featurize with grad_wrt naming only those (the default for a causal LM)."
        )
    batch_size = next(iter(batch.values())).shape[0]
    targets = {target.name: target for target in projector.targets}
    parts = []  # (offset, (B, T or 1, size), whether it has positions)
    for use, inputs, delta in projector.captured(task, weights, buffers, batch, batch_size):
        if delta is None:
            continue
        positioned = isinstance(use.module, nn.Embedding) or inputs.dim() > 2
        if use.weight is not None:
            target = targets[use.weight]
            rows, cols = projector.factor(model_id, target, "rows"), projector.factor(model_id, target, "cols")
            u, v = projected_pair(use.module, inputs, delta, rows, cols)
            parts.append((target.offset, torch.einsum("btr,btc->btrc", u, v).flatten(2), positioned))
        if use.bias is not None:
            target = targets[use.bias]
            parts.append((target.offset, delta @ projector.factor(model_id, target, "rows"), positioned))
    length = max((part.shape[1] for _, part, positioned in parts if positioned), default=0)
    out = torch.zeros(batch_size, length + 1, projector.proj_dim, device=projector.device)
    for offset, part, positioned in parts:
        where = slice(0, length) if positioned else slice(length, length + 1)
        out[:, where, offset : offset + part.shape[-1]] += part if positioned else part.sum(1, keepdim=True)
    return out if projector.kind == "identity" else out * math.sqrt(projector.proj_dim)
