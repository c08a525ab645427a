"""Featurize: a train split's features at every checkpoint, written to a ``FeatureStore``; and the
check that checkpoints given later are those the store was made at (``verify_checkpoints``).

For checkpoint m, loaded once (``FeatureMap.at``):

1. its fingerprint is checked against the one the store recorded for m (a store resumed
   with other weights is refused, or with ``overwrite`` that checkpoint's features are
   redone) and recorded if new;
2. each missing shard [start, stop) of x_i and Q_i is written, every process taking a
   contiguous share of them (``PartialState.split_between_processes``);
3. XᵀX_m = Σ_shards X_sᵀX_s (float64) is summed over processes (a k × k all-reduce: no
   features travel) and the main process writes λ_m and K_m (``hf_trak.kernel``).

Settings, train split and shard layout are checked for the whole store before anything is
written; a shard only appears once complete, so a killed run resumes where it stopped.
"""

import dataclasses
import logging
import os
import shutil
from typing import Callable, List, Optional, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import reduce
from tqdm.auto import tqdm

from .card import write_dataset_card
from .checkpoint_view import CheckpointView, FeatureMap
from .checkpoints import Checkpoint, checkpoint_source
from .config import TRAKConfig
from .data import ExampleSource
from .kernel import gram, regularized_inverse, resolve_lambda
from .store import FeatureStore, as_tensor

logger = logging.getLogger(__name__)


def featurize_store(
    feature_map: FeatureMap,
    config: TRAKConfig,
    source: ExampleSource,
    checkpoints: Sequence[Checkpoint],
    save_dir: Optional[str],
    state: PartialState,
    storage_dtype: torch.dtype,
    batch_size: int,
    overwrite: bool,
    sample_train_batch: Callable[[int, int], dict],
) -> FeatureStore:
    """Write (or complete) the store of ``source``'s features at ``checkpoints``; returns it."""
    if not checkpoints:
        raise ValueError("featurize needs at least one checkpoint (a state dict, model or save_pretrained folder).")
    if state.num_processes > 1 and save_dir is None:
        raise ValueError("save_dir is required with several processes: they share the feature store.")
    config = dataclasses.replace(
        config,
        num_checkpoints=len(checkpoints),
        num_train_examples=len(source),
        train_fingerprint=source.fingerprint,
        checkpoint_fingerprints=[""] * len(checkpoints),
        checkpoint_sources=[checkpoint_source(c) for c in checkpoints],
    )
    FeatureStore.validate(save_dir, config, overwrite)  # every process refuses alike, before any write
    store = FeatureStore.create_or_resume(save_dir, config, overwrite=overwrite) if state.is_main_process else None
    state.wait_for_everyone()
    store = store or FeatureStore.load(save_dir)
    recorded = list(store.config.checkpoint_fingerprints)  # as found: every process decides alike
    for model_id, checkpoint in enumerate(checkpoints):
        view = feature_map.at(checkpoint, model_id, sample_train_batch)
        _record_fingerprint(store, view, recorded[model_id], checkpoint, state, overwrite)
        _write_missing_shards(store, view, source, state, storage_dtype, batch_size)
        _write_kernel(store, model_id, feature_map.dim, feature_map.device, state)
    if state.is_main_process:
        write_dataset_card(store)
    state.wait_for_everyone()
    return store


def _record_fingerprint(store, view: CheckpointView, recorded: str, checkpoint, state, overwrite: bool) -> None:
    """Check checkpoint m's weights against the store's record of them, or record them."""
    model_id = view.model_id
    fingerprint, base = view.fingerprints()
    if recorded and recorded != fingerprint:
        if not overwrite:
            raise FileExistsError(
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


def _write_missing_shards(store, view: CheckpointView, source, state, storage_dtype, batch_size: int) -> None:
    missing = [(a, b) for a, b in store.shard_ranges() if not store.has_shard(view.model_id, a, b)]
    state.wait_for_everyone()  # every process has the same list before any shard is written
    with state.split_between_processes(missing) as mine:
        with tqdm(
            total=sum(stop - start for start, stop in mine),
            unit="example",
            desc=f"Featurizing checkpoint {view.model_id}",
            disable=None if state.is_main_process else True,
        ) as bar:
            for start, stop in mine:
                features, out_to_loss = [], []
                for batch in source.batches(batch_size, start, stop):
                    projected, prepared = view.features(batch)
                    features.append(projected.to(storage_dtype).cpu())
                    out_to_loss.append(view.out_to_loss(prepared).float().cpu())
                    bar.update(len(projected))
                features = torch.cat(features)
                if len(features) != stop - start:
                    raise ValueError(
                        f"The data yielded {len(features)} examples for rows [{start}, {stop}) "
                        "(a DataLoader with drop_last=True?)."
                    )
                store.write_shard(view.model_id, start, features.numpy(), torch.cat(out_to_loss).numpy())
    state.wait_for_everyone()


def _write_kernel(store: FeatureStore, model_id: int, dim: int, device, state: PartialState) -> None:
    """XᵀX_m over every shard (each process sums its share; one k × k all-reduce), then λ_m and K_m."""
    if store.has_kernel(model_id):
        return
    xtx = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    with state.split_between_processes(store.shard_ranges()) as mine:
        for start, stop in mine:
            xtx += gram(as_tensor(store.shard(model_id, start, stop)[0]).to(device))
    xtx = reduce(xtx, reduction="sum")
    if state.is_main_process:
        lambda_reg = resolve_lambda(xtx, store.config.lambda_reg, store.config.lambda_scale)
        store.save_kernel(model_id, xtx.cpu(), regularized_inverse(xtx, lambda_reg).cpu(), lambda_reg)
        logger.info("Checkpoint %d: k=%d, lambda=%.3g", model_id, dim, lambda_reg)
    state.wait_for_everyone()


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
            raise ValueError(
                f"The features were made at {stored.num_checkpoints} checkpoints "
                f"({stored.checkpoint_sources}); pass them as checkpoints=[...]."
            )
    if len(checkpoints) != stored.num_checkpoints:
        raise ValueError(f"The features were made at {stored.num_checkpoints} checkpoints, got {len(checkpoints)}.")
    for model_id, checkpoint in enumerate(checkpoints):
        weights, base = feature_map.at(checkpoint, model_id).fingerprints()
        if stored.base_fingerprint and base != stored.base_fingerprint:
            raise ValueError(
                f"Checkpoint {model_id} ({checkpoint_source(checkpoint)}) has another base model than the one the "
                f"adapter features were made with ({stored.base_model or 'recorded in the store'}): load the "
                "adapters onto that base model."
            )
        if weights != stored.checkpoint_fingerprints[model_id]:
            raise ValueError(
                f"Checkpoint {model_id} ({checkpoint_source(checkpoint)}) has other weights than the one the "
                f"features were made at ({stored.checkpoint_sources[model_id]}): pass the checkpoints used by "
                "featurize, in the same order."
            )
    return list(checkpoints)
