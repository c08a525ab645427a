"""The factored projector's sizes by spectrum (``block_sizes="spectrum"``), made once per store, before any feature.

The main process measures the per-token second moments of the weights' sides (those of at most
``MAX_PRINCIPAL_SIDE`` dimensions) over ``principal_fraction`` of the train rows (0.1 where that is 0), evenly
spaced, at the first checkpoint, and divides the weights' dimensions by them (``hf_trak.method.block_sizes``); the
other processes receive the result. The store records the shapes (``TRAKConfig.block_shapes``): a resumed run takes
them back, and scoring projects with them. Where k keeps every weight whole there is nothing to divide, and no pass.
"""

import dataclasses
import logging
import math
import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from hf_trak.hf.checkpoints import Checkpoint
from hf_trak.method.block_sizes import SideSample, spectrum_shapes
from hf_trak.method.feature_map import FeatureMap
from hf_trak.method.principal import MAX_PRINCIPAL_SIDE, principal_count
from hf_trak.run.side_samples import SideMoments
from hf_trak.store.config import CONFIG_NAME, TRAKConfig
from hf_trak.store.feature_store import FeatureStore

logger = logging.getLogger(__name__)

SAMPLE_FRACTION = 0.1  # of the train rows, where principal_fraction is 0 (no principal factors)


def sample_rows(fraction: float, num_rows: int) -> list:
    """The rows the sample passes read: ``fraction`` of ``num_rows`` (at least one), evenly spaced. The principal
    factors' pass and the block sizes' take the same rows, so that one's moments serve the other."""
    count = max(1, math.ceil(fraction * num_rows))
    return np.unique(np.linspace(0, num_rows - 1, count).round().astype(int)).tolist()


def with_block_shapes(
    feature_map: FeatureMap,
    config: TRAKConfig,
    source,
    checkpoint: Checkpoint,
    *,
    save_dir: Optional[str],
    overwrite: bool,
    state: PartialState,
    batch_size: int,
    sample_train_batch: Callable[[int, int], dict],
) -> Tuple[TRAKConfig, Optional[SideMoments]]:
    """(``config`` with the projector reshaped to its block shapes, the ``SideMoments`` measured): the shapes the
    store at ``save_dir`` recorded for these same settings and rows (unless ``overwrite``), else measured at
    ``checkpoint`` (the first); ``config`` unchanged for ``block_sizes="by_size"``. The moments are None where
    none were measured, on every process alike."""
    if config.block_sizes != "spectrum" or config.block_shapes:
        return config, None
    shapes = _recorded(config, save_dir) if not overwrite else None
    if shapes is not None:
        return feature_map.reshaped(config, shapes), None
    shapes, moments = _measured(feature_map, config, source, checkpoint, batch_size, sample_train_batch, state)
    return feature_map.reshaped(config, shapes), moments


def _recorded(config: TRAKConfig, save_dir: Optional[str]) -> Optional[Dict[str, Tuple[int, int]]]:
    """The shapes of the store at ``save_dir``, if it was made with ``config``'s settings and rows."""
    if save_dir is None or not os.path.isfile(os.path.join(save_dir, CONFIG_NAME)):
        return None
    stored = FeatureStore.load(save_dir).config
    if not stored.block_shapes:
        return None
    layout = dict(block_shapes=stored.block_shapes, feature_dim=stored.feature_dim, kernel_blocks=stored.kernel_blocks)
    same = not stored.mismatches(dataclasses.replace(config, **layout), resume=True)
    return {name: tuple(shape) for name, shape in stored.block_shapes.items()} if same else None


def _measured(feature_map, config, source, checkpoint, batch_size, sample_train_batch, state):
    """(The shapes by spectrum at ``checkpoint``, measured by the main process and sent to the others; the
    ``SideMoments`` they came from, or None where every weight is whole). A sharded model's passes over the sample
    run on every process alike (``hf_trak.hf.sharding``); the main process alone uses them."""
    projector = feature_map.projector
    weights = projector.weights()
    if all(t.k_rows == t.rows and t.k_cols == t.cols for t in weights):
        return {t.name: (t.rows, t.cols) for t in weights}, None  # every weight whole: nothing to divide
    shapes, found = None, SideMoments({}, {})
    sides = [(t, side) for t in weights for side, dim in (("rows", t.rows), ("cols", t.cols))
             if dim <= MAX_PRINCIPAL_SIDE]  # fmt: skip  # a larger side (a vocabulary's) would need a d × d moment
    samples, rows = {}, sample_rows(config.principal_fraction or SAMPLE_FRACTION, len(source))
    if state.is_main_process or feature_map.sharded:  # a sharded model's passes run on every process
        view = feature_map.at(checkpoint, 0, sample_train_batch)
        for begin in tqdm(range(0, len(rows), batch_size), desc="Block sizes", disable=not state.is_main_process):
            for name, tokens in view.side_tokens(source.batch(rows[begin : begin + batch_size]), sides):
                if state.is_main_process:  # the others only keep FSDP's gathers in step
                    samples.setdefault(name, SideSample()).add(tokens)
    if state.is_main_process:
        energy = {}
        for target, side in sides:
            name = f"{target.name}/{side}"
            if name in samples:
                energy[(target.name, side)], vectors = samples[name].spectrum()
                if vectors is not None:
                    found.leading[name] = vectors
        shapes = spectrum_shapes(weights, energy, sum(t.size for t in weights))
        logger.info("Block sizes by spectrum, from %d train rows: %s", len(rows), shapes)
        for target, side in sides:  # where a principal factor needs more eigenvectors than found: from the
            name, index = f"{target.name}/{side}", 0 if side == "rows" else 1  # tokens (n < d), else F itself
            dim, k = (target.rows, target.cols)[index], shapes[target.name][index]
            needed = principal_count(k, dim, config.principal_share)
            if name in samples and needed > (found.leading[name].shape[1] if name in found.leading else 0):
                found.take(name, samples[name], needed)
    if state.num_processes > 1:
        shapes = broadcast_object_list([shapes])[0]
    return shapes, found
