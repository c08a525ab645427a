"""Featurize: a train split's features at every checkpoint, written to a ``FeatureStore``; and the
check that checkpoints given later are those the store was made at (``verify_checkpoints``).

For checkpoint m, loaded once (``FeatureMap.at``):

1. its fingerprint is checked against the one the store recorded for m (a store resumed
   with other weights is refused, or with ``overwrite`` that checkpoint's features are
   redone) and recorded if new; with principal factors (``principal_share`` > 0), they are
   made once from a sample of the rows and stored before any feature of m
   (``_write_principal_factors``);
2. each missing shard [start, stop) of x_i and Q_i is written, every process taking a
   contiguous share of them (``PartialState.split_between_processes``);
3. K_m, then Φ_m = X_m K_m (``hf_trak.run.kernels.finalize_checkpoint``), so that scoring
   reads Φ and never forms it.

Every row of the train split is checked and hashed first (``hf_trak.data.inputs``), so bad
input fails before anything is written; settings, train rows and shard layout are checked
against an existing store before anything is computed. A shard only appears once complete,
so a killed run resumes where it stopped; a resume redoes shards and kernels that do not
read back as written. With ``on_nonfinite="exclude"``, a row whose inputs, features or Q
are not finite gets features 0 (so XᵀX is that of the other rows) and Q = NaN (so its
scores are NaN), and is listed in the config's ``excluded_rows``.
"""

import contextlib
import dataclasses
import logging
import os
import shutil
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from hf_trak.data.inputs import scan_split
from hf_trak.data.source import ExampleSource
from hf_trak.errors import (
    DiskFullError,
    InvalidArgumentError,
    InvalidInputError,
    OutputExistsError,
    StoreMismatchError,
)
from hf_trak.hf.checkpoints import Checkpoint, checkpoint_source
from hf_trak.hf.sharding import passes_short
from hf_trak.method.feature_map import CheckpointView, FeatureMap
from hf_trak.method.principal import principal_count
from hf_trak.method.shared_outputs import shared_outputs
from hf_trak.run.block_shapes import sample_rows, with_block_shapes
from hf_trak.run.kernels import finalize_checkpoint, statistics_kind
from hf_trak.run.memory import batch_size_for
from hf_trak.run.side_samples import BatchMoments, SideMoments, combined
from hf_trak.store import lock
from hf_trak.store.card import write_dataset_card
from hf_trak.store.config import CONFIG_NAME, TRAKConfig
from hf_trak.store.feature_store import FeatureStore, shard_ranges
from hf_trak.store.kernel_file import packed_length
from hf_trak.store.provenance import first_difference, shard_hashes
from hf_trak.store.versions import keeps_kernel_blocks

logger = logging.getLogger(__name__)


def featurize_store(
    feature_map: FeatureMap,
    config: TRAKConfig,
    source: ExampleSource,
    checkpoints: Sequence[Checkpoint],
    *,
    save_dir: Optional[str],
    state: PartialState,
    storage_dtype: torch.dtype,
    batch_size: Optional[int],
    overwrite: bool,
    sample_train_batch: Callable[[int, int], dict],
    on_nonfinite: str = "error",
    lock_timeout: Optional[float] = None,
) -> FeatureStore:
    """Write (or complete) the store of ``source``'s features at ``checkpoints``; returns it. ``save_dir``: the
    store (None: a temporary folder); ``state``: the processes; ``storage_dtype``: of the stored features;
    ``overwrite``: replace a store made otherwise; ``sample_train_batch``: training examples for tasks that need
    them (CLIP); ``batch_size``: None for ``hf_trak.run.memory``'s; ``on_nonfinite``: "error" or "exclude";
    ``lock_timeout``: how long to wait for another process featurizing the same store (``hf_trak.store.lock``: the
    runs take turns). A full device is a ``DiskFullError`` naming the file and the space the store needs; what was
    written completely is kept, and a rerun resumes."""
    if not checkpoints:
        raise InvalidArgumentError(
            "featurize needs at least one checkpoint (a state dict, model or save_pretrained folder)."
        )
    if state.num_processes > 1 and save_dir is None:
        raise InvalidArgumentError("save_dir is required with several processes: they share the feature store.")
    feature_map.check_checkpoints(checkpoints)
    scan = scan_split(source, feature_map.task, feature_map.model, "train", on_nonfinite, state.is_main_process)
    batch_size = batch_size or batch_size_for(feature_map, scan.longest)  # None: what the free memory fits
    work = (feature_map, config, source, checkpoints, scan, save_dir, state, storage_dtype, batch_size, overwrite,
            sample_train_batch, on_nonfinite)  # fmt: skip
    if save_dir is None:
        return _featurize(*work)
    holding = lock.writing(save_dir, lock_timeout) if state.is_main_process else contextlib.nullcontext()
    with holding:  # from the first look at the store to the last write: another featurization waits
        state.wait_for_everyone()  # every process starts once the main one holds the store
        try:
            return _featurize(*work)
        except DiskFullError as error:
            needed = _expected_bytes(config, feature_map, len(source), len(checkpoints))
            raise DiskFullError(
                f"{error} The complete store needs about {needed / 2**20:.1f} MiB in {save_dir}: free space (or "
                "choose another save_dir) and run featurize again: it resumes from the files written completely."
            ) from error


def _featurize(feature_map, config, source, checkpoints, scan, save_dir, state, storage_dtype, batch_size, overwrite,
               sample_train_batch, on_nonfinite):  # fmt: skip
    """``featurize_store``'s work once the split is checked (``scan``) and the store held."""
    config = dataclasses.replace(
        config,
        num_checkpoints=len(checkpoints),
        num_train_examples=len(source),
        train_fingerprint=source.fingerprint,
        train_hashes=shard_hashes(scan.row_hashes, shard_ranges(len(source), config.shard_size)),
        excluded_rows=scan.nonfinite_rows,
        checkpoint_fingerprints=[""] * len(checkpoints),
        checkpoint_sources=[checkpoint_source(c) for c in checkpoints],
    )
    config, measured = with_block_shapes(feature_map, config, source, checkpoints[0], save_dir=save_dir,
                                         overwrite=overwrite, state=state, batch_size=batch_size,
                                         sample_train_batch=sample_train_batch)  # fmt: skip
    _check_resumed_rows(save_dir, scan.row_hashes, overwrite)
    FeatureStore.validate(save_dir, config, overwrite)  # every process refuses alike, before any write
    store = FeatureStore.create_or_resume(save_dir, config, overwrite=overwrite) if state.is_main_process else None
    if store is not None and store.row_hashes() is None:
        store.save_row_hashes(scan.row_hashes)
    state.wait_for_everyone()
    store = store or FeatureStore.load(save_dir)
    feature_map.store = store  # its views use the store's principal factors
    recorded = list(store.config.checkpoint_fingerprints)  # as found: every process decides alike
    excluded = set(scan.nonfinite_rows)
    for model_id, checkpoint in enumerate(checkpoints):
        _check_principal_factors(store, model_id, state)
        view = feature_map.at(checkpoint, model_id, sample_train_batch)
        _record_fingerprint(store, view, recorded[model_id], checkpoint, state, overwrite)
        _write_principal_factors(store, view, source, state, batch_size, measured)
        measured = None  # the first checkpoint's moments, d × d per side: not held while its features are made
        _write_missing_shards(store, view, source, state, storage_dtype, batch_size, on_nonfinite, excluded)
        finalize_checkpoint(store, model_id, feature_map.device, state)
    if state.is_main_process:
        if on_nonfinite == "exclude":
            _record_excluded_rows(store)
        write_dataset_card(store)
    state.wait_for_everyone()
    return store if state.is_main_process else FeatureStore.load(save_dir)  # with what the main process recorded


def _expected_bytes(config: TRAKConfig, feature_map: FeatureMap, num_rows: int, num_checkpoints: int) -> int:
    """About how many bytes a complete store of ``config`` takes, with ``feature_map``'s projector as it is now (its
    block shapes measured or not): per checkpoint X and Φ (n × k in the features' dtype, with index and Q), the
    kernel file (two k × k float64, or their diagonal blocks), and per shard the per-token statistics (float64): each
    weight's Kronecker factors, k_r² + k_c², and each other block's k_b² Gram matrix, with a weight's own k_b² one
    where ``statistics_kind`` is "tokens"."""
    k, itemsize = feature_map.dim, 2 if config.dtype == "float16" else 4
    shards = 2 * (num_rows * k * itemsize + num_rows * 12)
    kernel_blocks = feature_map.kernel_blocks(config.kernel)
    blocks = kernel_blocks and keeps_kernel_blocks(config.store_version)
    kernel = 2 * (packed_length(kernel_blocks) if blocks else k * k) * 8 + k * 8
    statistics = 0
    if config.kernel_from != "examples":
        weights = [(t.k_rows, t.k_cols) for t in feature_map.projector.weights()]
        grams = sum(size * size for _, size in kernel_blocks)
        if statistics_kind(config) == "ekfac":
            grams -= sum((rows * cols) ** 2 for rows, cols in weights)
        factors = sum(rows * rows + cols * cols for rows, cols in weights)
        statistics = len(shard_ranges(num_rows, config.shard_size)) * (grams + factors) * 8
    return num_checkpoints * (shards + kernel + statistics)


def _check_resumed_rows(save_dir: Optional[str], row_hashes, overwrite: bool) -> None:
    """Refuse to resume a store made from other train rows, naming the first differing row."""
    if save_dir is None or overwrite or not os.path.isfile(os.path.join(save_dir, CONFIG_NAME)):
        return
    existing = FeatureStore.load(save_dir)
    stored = existing.row_hashes()
    if stored is None or not FeatureStore.holds_work(save_dir):
        return
    row = first_difference(stored, row_hashes)
    if row is not None:
        raise OutputExistsError(
            f"{save_dir} holds features of another train split: {len(row_hashes)} rows given, {len(stored)} stored, "
            f"first differing row {row}. Pass the split it was made from (same rows, same order), another "
            "save_dir, or overwrite=True to delete them."
        )


def _record_excluded_rows(store: FeatureStore) -> None:
    """The rows whose Q is NaN at some checkpoint (excluded for non-finite values), in the config."""
    rows = set(store.config.excluded_rows)
    for model_id in range(store.config.num_checkpoints):
        for start, _, out_to_loss in store.shards(model_id):
            rows.update((start + np.flatnonzero(np.isnan(out_to_loss))).tolist())
    store.record_excluded_rows(sorted(rows))


def _record_fingerprint(store, view: CheckpointView, recorded: str, checkpoint, state, overwrite: bool) -> None:
    """Check checkpoint m's weights against the store's record of them, or record them."""
    model_id = view.model_id
    fingerprint, base = view.fingerprints()
    if recorded and recorded != fingerprint:
        if not overwrite:
            raise OutputExistsError(
                f"{store.root} holds features of another checkpoint {model_id} than "
                f"{checkpoint_source(checkpoint)} (its weights differ). Pass the checkpoints of that run in the same "
                "order, another save_dir, or overwrite=True to redo this checkpoint's features."
            )
        logger.warning("Redoing the features of checkpoint %d in %s (overwrite=True).", model_id, store.root)
        if state.is_main_process:
            shutil.rmtree(store.checkpoint_dir(model_id), ignore_errors=True)
    if recorded != fingerprint and state.is_main_process:
        store.record_checkpoint(model_id, fingerprint, base if model_id == 0 else None)
    state.wait_for_everyone()


def _check_principal_factors(store: FeatureStore, model_id: int, state: PartialState) -> None:
    """Before checkpoint m is loaded: principal factors missing (or corrupt: reported and deleted) beside written
    features mean those features were projected with factors that are lost, so the checkpoint's files are deleted,
    to be redone."""
    if store.config.principal_share and state.is_main_process and not store.has_valid_principal_factors(model_id):
        folder = store.checkpoint_dir(model_id)
        if os.path.isdir(folder) and os.listdir(folder):
            logger.warning("Checkpoint %d's principal factors are missing: redoing its features.", model_id)
            shutil.rmtree(folder)
    state.wait_for_everyone()


def _write_principal_factors(
    store: FeatureStore, view: CheckpointView, source, state, batch_size: int, measured: Optional[SideMoments] = None
) -> None:
    """Checkpoint m's principal factors (``principal_share`` > 0), unless stored: the leading eigenvectors of each
    principal side's per-token second moment over ``principal_fraction`` of the train rows, evenly spaced (each
    process a share, ``_principal_moments``; or ``measured``, from the main process's pass over the same rows and
    checkpoint for the block sizes, ``hf_trak.run.block_shapes``), made by the main process and written once (every
    process and every later scoring projects with the same factors), then set on the projector (``FeatureMap.at``
    set those already stored)."""
    projector, model_id = view.map.projector, view.model_id
    if not store.config.principal_share:
        return
    stored = store.has_principal_factors(model_id)
    state.wait_for_everyone()  # every process has looked before the main one writes them
    if stored:
        return
    if measured is None:
        measured = _principal_moments(view, source, state, batch_size, store)
    if state.is_main_process:
        factors = projector.principal_factors(model_id, measured.moments, measured.leading)
        store.save_principal_factors(model_id, factors)
    state.wait_for_everyone()
    projector.set_factors(model_id, store.principal_factors(model_id))  # stored ones: set by FeatureMap.at


def _principal_moments(view: CheckpointView, source, state, batch_size: int, store: FeatureStore) -> SideMoments:
    """What the principal factors are made from, over the principal factors' sample rows, each process a share of
    the batches (``hf_trak.run.side_samples``: each side's tokens where the sample holds fewer than d, else F)."""
    projector = view.map.projector
    sides = projector.principal_sides()  # none where every side is small enough for k = d: an empty file
    rows = sample_rows(store.config.principal_fraction, len(source))
    samples = {}
    # Batches of the sample, the same whatever the number of processes (each takes a share of them): a batch's
    # moment is then the same bits everywhere, and only the float64 sum's order depends on the processes.
    batches = [rows[begin : begin + batch_size] for begin in range(0, len(rows), batch_size)]
    with state.split_between_processes(batches) as mine:
        short = passes_short(state, len(mine)) if view.map.sharded else 0
        for batch in tqdm(mine, desc=f"Principal factors, checkpoint {view.model_id}",
                          disable=None if state.is_main_process else True):  # fmt: skip
            for name, sample in view.side_samples(source.batch(batch)).items():
                samples.setdefault(name, BatchMoments()).add(sample)
    for _ in range(short):  # a sharded model: as many passes as the other processes
        view.side_samples(source.batch(batches[0]))
    dims, counts = {}, {}
    for target, side in sides:
        name = f"{target.name}/{side}"
        dim, k = target.side(side)
        dims[name], counts[name] = dim, principal_count(k, dim, store.config.principal_share)
    return combined(samples, dims, counts, state, view.map.device)


def _write_missing_shards(
    store, view: CheckpointView, source, state, storage_dtype, batch_size: int, on_nonfinite: str, excluded: set
) -> None:
    kernel_from = store.config.kernel_from
    statistics = kernel_from != "examples"  # the per-token statistics a kernel needs, written beside each shard
    if state.is_main_process:  # corrupt shards (and statistics) are reported and deleted, once
        for start, stop in store.shard_ranges():
            store.has_valid_shard(view.model_id, start, stop)
            if statistics:
                store.has_valid_statistics(view.model_id, start, stop)
    state.wait_for_everyone()
    missing = [
        (a, b)
        for a, b in store.shard_ranges()
        if not store.has_shard(view.model_id, a, b) or (statistics and not store.has_statistics(view.model_id, a, b))
    ]
    state.wait_for_everyone()  # every process has the same list before any shard is written
    with state.split_between_processes(missing) as mine:
        planned = sum(source.batch_count(batch_size, start, stop) for start, stop in mine)
        short = passes_short(state, planned) if view.map.sharded else 0
        with tqdm(
            total=sum(stop - start for start, stop in mine),
            unit="example",
            desc=f"Featurizing checkpoint {view.model_id}",
            disable=None if state.is_main_process else True,
        ) as bar:
            for start, stop in mine:
                features, out_to_loss = [], []
                if statistics:
                    view.map.projector.start_statistics(statistics_kind(store.config))
                for batch in source.batches(batch_size, start, stop):
                    with shared_outputs():  # Q from the features' forward pass: one forward per batch
                        projected, prepared = view.features(batch)
                        q = view.out_to_loss(prepared).float()
                    offset = start + sum(len(block) for block in features)
                    projected, q = _finite_rows(projected, q, offset, view.model_id, on_nonfinite, excluded)
                    features.append(projected.to(storage_dtype).cpu())
                    out_to_loss.append(q.cpu())
                    bar.update(len(projected))
                features = torch.cat(features)
                if len(features) != stop - start:
                    raise InvalidInputError(
                        f"The data yielded {len(features)} examples for rows [{start}, {stop}) "
                        "(a DataLoader with drop_last=True?)."
                    )
                if statistics:  # written before the shard: a shard on disk always has its statistics
                    store.write_statistics(view.model_id, start, stop, view.map.projector.statistics)
                    view.map.projector.statistics = None
                store.write_shard(view.model_id, start, features.numpy(), torch.cat(out_to_loss).numpy())
    for _ in range(short):  # a sharded model: as many passes as the other processes
        view.features(source.batch([0]))
    state.wait_for_everyone()


def _finite_rows(features, q, offset: int, model_id: int, on_nonfinite: str, excluded: set):
    """``(features, Q)`` of a batch of rows from ``offset``, its non-finite rows refused or excluded
    (features 0, Q NaN)."""
    bad = ~torch.isfinite(features).all(dim=1) | ~torch.isfinite(q)
    for row in excluded.intersection(range(offset, offset + len(q))):
        bad[row - offset] = True
    if not bad.any():
        return features, q
    rows = (offset + torch.nonzero(bad).reshape(-1)).tolist()
    if on_nonfinite == "error":
        raise InvalidInputError(
            f"Row {rows[0]} of the train split has non-finite gradients or Q at checkpoint {model_id} (NaN/inf): "
            "check that row and the checkpoint's weights, or pass on_nonfinite='exclude' (hf-trak: "
            "--on-nonfinite exclude) to give it NaN scores."
        )
    logger.warning("Checkpoint %d: excluding train row(s) %s (non-finite inputs, gradients or Q).", model_id, rows)
    features, q = features.clone(), q.clone()
    features[bad], q[bad] = 0.0, float("nan")
    return features, q


def verify_checkpoints(
    feature_map: FeatureMap, store: FeatureStore, checkpoints: Optional[Sequence[Checkpoint]]
) -> List[Checkpoint]:
    """The checkpoints a complete store was made at, each loaded once to check its fingerprint.

    ``checkpoints`` None: the recorded paths if they all exist, or the model itself for a
    single checkpoint. A different count, base model or weights is refused with the fix named.
    """
    stored = store.config
    if checkpoints is None:
        if all(os.path.exists(source) for source in stored.checkpoint_sources):
            checkpoints = stored.checkpoint_sources
        elif stored.num_checkpoints == 1:
            checkpoints = [feature_map.model]
        else:
            raise StoreMismatchError(
                f"The features were made at {stored.num_checkpoints} checkpoints "
                f"({stored.checkpoint_sources}); pass them as checkpoints=[...]."
            )
    if len(checkpoints) != stored.num_checkpoints:
        raise StoreMismatchError(
            f"The features were made at {stored.num_checkpoints} checkpoints, got {len(checkpoints)}."
        )
    for model_id, checkpoint in enumerate(checkpoints):
        weights, base = feature_map.at(checkpoint, model_id).fingerprints()
        if stored.base_fingerprint and base != stored.base_fingerprint:
            raise StoreMismatchError(
                f"Checkpoint {model_id} ({checkpoint_source(checkpoint)}) has another base model than the one the "
                f"adapter features were made with ({stored.base_model or 'recorded in the store'}): load the "
                "adapters onto that base model."
            )
        if weights != stored.checkpoint_fingerprints[model_id]:
            raise StoreMismatchError(
                f"Checkpoint {model_id} ({checkpoint_source(checkpoint)}) has other weights than the one the "
                f"features were made at ({stored.checkpoint_sources[model_id]}): pass the checkpoints used by "
                "featurize, in the same order."
            )
    return list(checkpoints)
