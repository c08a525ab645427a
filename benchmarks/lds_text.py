"""LDS on a text task: dense vs. factored projection at the same proj_dim (offline, ~2 min on CPU).

    python benchmarks/lds_text.py

Task: token sequences over a 30-token vocabulary, labelled by which of two marker tokens
occurs more often (ties: by the first token). A 1-layer ``BertForSequenceClassification``
(hidden 32) is trained on 400 examples; 48 models are retrained on random halves, and LDS
is measured on 60 held-out sequences for each projector over 3 projection seeds. Both
projectors differentiate the same parameters (Linear and Embedding weights and biases).
"""

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from hf_trak import TRAKer
from hf_trak.evaluate import lds, make_subsets, model_outputs
from hf_trak.method.factored import factorable_parameter_names

NUM_TRAIN, NUM_TARGETS, LENGTH, VOCAB = 400, 60, 12, 30


def sequences(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(n, LENGTH))
    labels = ((ids == 3).sum(1) > (ids == 4).sum(1)) | (
        ((ids == 3).sum(1) == (ids == 4).sum(1)) & (ids[:, 0] % 2 == 0)
    )
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": np.ones_like(ids).tolist(),
            "labels": labels.astype(int).tolist(),
        }
    )


def bert(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=LENGTH,
            num_labels=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def train(data: Dataset, mask: np.ndarray, seed: int, steps: int = 150) -> BertForSequenceClassification:
    model = bert(seed)
    rows = data.with_format("torch")[np.flatnonzero(mask)]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(input_ids=rows["input_ids"]).logits, rows["labels"]).backward()
        optimizer.step()
    return model.eval()


def main():
    train_data, test_data = sequences(NUM_TRAIN, seed=0), sequences(NUM_TARGETS, seed=1)
    masks = make_subsets(NUM_TRAIN, 48, fraction=0.5, seed=0)
    outputs = np.stack([model_outputs(train(train_data, mask, seed=0), test_data) for mask in masks])
    checkpoints = [train(train_data, np.ones(NUM_TRAIN, bool), seed=s).state_dict() for s in range(3)]
    model = bert(0)
    for proj_dim in (256, 1024):
        for projector in ("rademacher", "factored"):
            values = []
            for seed in range(3):
                traker = TRAKer(
                    model,
                    estimator="trak",
                    projector=projector,
                    proj_dim=proj_dim,
                    projector_seed=seed,
                    save_dir=None,
                    grad_wrt=factorable_parameter_names(model),
                )
                traker.featurize(train_data, checkpoints, batch_size=100)
                values.append(lds(traker.score(test_data, batch_size=100), masks, outputs).mean)
            print(
                f"proj_dim {proj_dim:5d}  {projector:10s}  LDS {np.mean(values):.3f} ± {np.std(values):.3f} "
                f"(seeds: {', '.join(f'{v:.3f}' for v in values)})"
            )


if __name__ == "__main__":
    main()
