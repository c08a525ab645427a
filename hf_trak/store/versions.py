"""The store format's versions: what each holds, how an older store is read, and what its features were made with.

``STORE_VERSION`` is the format this hf_trak writes; every store records its own (``TRAKConfig.store_version``)
and is read and scored as it was written. This module is the one place that knows the versions:

=======  ===========================================================================================
version  what it added
=======  ===========================================================================================
1        the first format: features, Q and kernels per checkpoint; λ = 0.1·tr(XᵀX)/k.
2        XᵀX and K kept in float64, λ's scale recorded (``lambda_scale``), checkpoint fingerprints recorded
         as featurize loads each checkpoint, PEFT adapter provenance.
3        the train split's row hashes (``train_rows.arrow``, ``train_hashes``), shard checksums, excluded
         rows; Φ = XK stored at featurize (scoring reads it and never forms it); the factored projector's
         sizes fill ``proj_dim`` (before: at most ``proj_dim``, often fewer).
4        the factored projector gives each matrix equal sides (k_r ≈ k_c) where the kernel is built from
         per-token gradients (``kernel_from="tokens"``).
5        principal factors (``principal_share``, ``principal_fraction``, ``principal-factors.safetensors``
         per checkpoint) and per-token kernels shrunk toward K-FAC (``kernel_shrinkage``); a store of a
         version above the reader's is refused.
6        the factored projector's sizes by spectrum (``block_sizes``, ``block_shapes``: each weight's k_r × k_c,
         made from the data at the first checkpoint and recorded).
7        a block-diagonal (per-module) K is kept as its diagonal blocks, with XᵀX's diagonal blocks only
         (``kernel.safetensors``: ``kernel_blocks``, ``xtx_blocks``); the normalized ensemble's σ comes from them;
         ``kernel_from="mixed"``.
=======  ===========================================================================================

A field a store does not record (it predates the field) takes the value that store was made with
(``IMPLIED_BEFORE_RECORDED``), so older stores load and score unchanged.
"""

from hf_trak.errors import StoreMismatchError

STORE_VERSION = 7

# The value of each field for a store written before the field was recorded.
IMPLIED_BEFORE_RECORDED = {
    "store_version": 1,
    "lambda_scale": 0.1,  # TRAK's λ = 0.1·tr(XᵀX)/k
    "feature_dim": 0,
    "train_weight": "out_to_loss",  # TRAK's Q
    "kernel": "global",
    "kernel_blocks": [],
    "kernel_from": "examples",
    "ensemble": "mean",
    "principal_share": 0.0,
    "principal_fraction": 0.0,
    "kernel_shrinkage": 0.0,
    "block_sizes": "by_size",
}


def upgrade(fields: dict, root: str = "") -> dict:
    """The fields of a store's config of any version up to ``STORE_VERSION``, those it predates filled in; a newer
    store is refused (``StoreMismatchError`` naming the upgrade)."""
    fields = {**IMPLIED_BEFORE_RECORDED, **fields}
    if fields["store_version"] > STORE_VERSION:
        raise StoreMismatchError(
            f"{root or 'The store'} is a version-{fields['store_version']} store (hf_trak "
            f"{fields.get('hf_trak_version', '?')}); this hf_trak reads versions up to {STORE_VERSION}: upgrade "
            "hf_trak (pip install -U hf_trak)."
        )
    return fields


def factored_sizing(store_version: int, kernel_from: str) -> str:
    """How the factored projector sizes its matrices for a store of ``store_version``: ``"legacy"`` (before 3),
    ``"square"`` (from 4, for per-token kernels: ``kernel_from`` "tokens" or "mixed") or ``"fill"``."""
    if store_version < 3:
        return "legacy"
    return "square" if store_version >= 4 and kernel_from in ("tokens", "mixed") else "fill"


def has_principal_factors(store_version: int) -> bool:
    """Whether the format has principal factors and kernel shrinkage (hf_trak's per-token defaults use them)."""
    return store_version >= 5


def has_block_shapes(store_version: int) -> bool:
    """Whether the format records the factored projector's sizes by spectrum (hf_trak's default uses them)."""
    return store_version >= 6


def stores_preconditioned(store_version: int) -> bool:
    """Whether featurize stores Φ = XK (scoring forms it from X and K for older stores)."""
    return store_version >= 3


def keeps_kernel_blocks(store_version: int) -> bool:
    """Whether the format keeps a block-diagonal K, and XᵀX, as their diagonal blocks only (and has
    ``kernel_from="mixed"``)."""
    return store_version >= 7
