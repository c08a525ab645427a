"""A store from someone else is checked against its own config before anything it asks for is allocated.

``check_store`` reads only the config, the shard files' schemas (memory-mapped, no data) and the safetensors
headers: the sizes the config states (k, n, shard size, checkpoints, kernel blocks) must be sane and agree with
one another, and every file must have the shape they imply. A file that disagrees is a ``CorruptStoreError``
naming it; missing files are an ``IncompleteStoreError`` listing them. The card (``README.md``) is never parsed.
"""

import os
from typing import List

import pyarrow as pa
from safetensors import safe_open

from hf_trak.errors import CorruptStoreError, IncompleteStoreError
from hf_trak.store.feature_store import (
    COLUMNS,
    FEATURES,
    PRECONDITIONED,
    ROWS_KEY,
    FeatureStore,
)
from hf_trak.store.kernel_file import KERNEL_NAME, PACKED, packed_length
from hf_trak.store.versions import stores_preconditioned

MAX_FEATURE_DIM = 2**20  # k × k float64 kernels: 8 TiB at this size; a config above it is not a real store
MAX_SEED = 2**63
REDO = "run featurize again with the same arguments to redo it (or download the store again)"


def _fail(store: FeatureStore, what: str) -> CorruptStoreError:
    return CorruptStoreError(f"The store in {store.root} is inconsistent: {what}. It cannot be scored as it is.")


def _check_config(store: FeatureStore) -> None:
    config = store.config
    k, n = config.feature_dim, config.num_train_examples
    if not (isinstance(k, int) and 0 < k <= MAX_FEATURE_DIM):
        raise _fail(store, f"feature_dim {k!r} is not in 1..{MAX_FEATURE_DIM}")
    if not (isinstance(n, int) and n > 0) or not (isinstance(config.shard_size, int) and config.shard_size > 0):
        raise _fail(store, f"{n!r} train examples in shards of {config.shard_size!r} rows")
    if not (isinstance(config.projector_seed, int) and 0 <= config.projector_seed < MAX_SEED):
        raise _fail(store, f"projector_seed {config.projector_seed!r} is out of range")
    if not (isinstance(config.num_checkpoints, int) and config.num_checkpoints > 0):
        raise _fail(store, f"num_checkpoints is {config.num_checkpoints!r}")
    if len(config.checkpoint_fingerprints) != config.num_checkpoints:
        raise _fail(store, f"{len(config.checkpoint_fingerprints)} checkpoint fingerprints for "
                           f"{config.num_checkpoints} checkpoints")  # fmt: skip
    if config.train_hashes and len(config.train_hashes) != len(store.shard_ranges()):
        raise _fail(store, f"{len(config.train_hashes)} shard hashes for {len(store.shard_ranges())} shards of rows")
    if config.kernel_blocks:
        offset = 0
        for block in config.kernel_blocks:
            if len(block) != 2 or block[0] != offset or not (isinstance(block[1], int) and block[1] > 0):
                raise _fail(store, f"the kernel blocks {config.kernel_blocks!r} do not tile 0..{k}")
            offset += block[1]
        if offset != k:
            raise _fail(store, f"the kernel blocks cover {offset} of the {k} features")


def _check_shard(store: FeatureStore, path: str, rows: int, kind: str) -> None:
    try:
        with pa.memory_map(path, "r") as source:
            schema = pa.ipc.open_file(source).schema
    except (pa.ArrowException, OSError) as error:
        raise CorruptStoreError(f"Shard {path} is corrupt ({error}): {REDO}.") from error
    column = schema.field(COLUMNS[kind]).type if COLUMNS[kind] in schema.names else None
    width = getattr(column, "list_size", None)
    if width != store.config.feature_dim:
        raise _fail(store, f"{path} holds {width} features per row, the config {store.config.feature_dim}")
    recorded = (schema.metadata or {}).get(ROWS_KEY)
    if recorded is not None and int(recorded) != rows:
        raise _fail(store, f"{path} holds {int(recorded)} rows, its range {rows}")


def _check_kernel(store: FeatureStore, path: str) -> None:
    k = store.config.feature_dim
    try:
        with safe_open(path, framework="pt") as file:
            shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    except Exception as error:  # safetensors' own error on a bad header
        raise CorruptStoreError(f"{path} is corrupt ({error}): {REDO}.") from error
    packed = (packed_length(store.config.kernel_blocks),)
    for name, expected in [(PACKED[n], packed) if store.keeps_kernel_blocks else (n, (k, k)) for n in PACKED]:
        if shapes.get(name) != expected:
            raise _fail(store, f"{path} holds {name} of shape {shapes.get(name)}, not {expected}")


def check_store(store: FeatureStore) -> None:
    """Check ``store`` for scoring (see the module docstring)."""
    _check_config(store)
    missing: List[str] = []
    kinds = [FEATURES] + ([PRECONDITIONED] if stores_preconditioned(store.config.store_version) else [])
    for model_id in range(store.config.num_checkpoints):
        kernel = os.path.join(store.checkpoint_dir(model_id), KERNEL_NAME)
        if os.path.isfile(kernel):
            _check_kernel(store, kernel)
        else:
            missing.append(kernel)
        if store.config.principal_share and not store.has_principal_factors(model_id):
            missing.append(store.principal_factors_path(model_id))
        for start, stop in store.shard_ranges():
            for kind in kinds:
                path = store.shard_path(model_id, start, stop, kind)
                if os.path.isfile(path):
                    _check_shard(store, path, stop - start, kind)
                else:
                    missing.append(path)
    unrecorded = [m for m, fingerprint in enumerate(store.config.checkpoint_fingerprints) if not fingerprint]
    if missing or unrecorded:
        shown = ", ".join(os.path.relpath(path, store.root) for path in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        what = f"{len(missing)} file(s) missing: {shown}{more}" if missing else f"checkpoints {unrecorded} unrecorded"
        raise IncompleteStoreError(
            f"The store in {store.root} is incomplete ({what}): "
            "if you featurized it, run featurize again with the same arguments to resume it; if you downloaded it, "
            "its repo was pushed incomplete or the download was cut: download it again."
        )
