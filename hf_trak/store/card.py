"""Cards rendered from the jinja templates in ``templates/``: the features repo's and the trained model's section."""

import os
from importlib import resources

import jinja2
from huggingface_hub import DatasetCard, DatasetCardData

from hf_trak.store.feature_store import FeatureStore
from hf_trak.store.files import write_text


def _template(name: str) -> str:
    return resources.files("hf_trak.store").joinpath("templates", name).read_text()


def render_dataset_card(store: FeatureStore, repo_id: str = "<user>/<features-repo>") -> DatasetCard:
    """The README of a features repo: YAML ``configs`` (one per checkpoint and per saved scores) and docs."""
    config = store.config
    configs = [
        {
            "config_name": f"checkpoint-{m}",
            "data_files": [{"split": "train", "path": f"checkpoint-{m}/features-*.arrow"}],
        }
        for m in range(config.num_checkpoints)
    ]
    score_names = store.score_names()
    configs += [
        {"config_name": f"scores-{name}", "data_files": [{"split": "train", "path": f"scores/{name}.arrow"}]}
        for name in score_names
    ]
    card_data = DatasetCardData(configs=configs, tags=["trak", "data-attribution", "hf-trak"])
    content = jinja2.Template(_template("trak_features_card.md")).render(
        card_data=card_data.to_yaml(),
        config=config,
        repo_id=repo_id,
        score_names=score_names,
        blocks=store.keeps_kernel_blocks,
    )
    return DatasetCard(content)


def write_dataset_card(store: FeatureStore, repo_id: str = "<user>/<features-repo>") -> None:
    write_text(os.path.join(store.root, "README.md"), str(render_dataset_card(store, repo_id)))


def render_trainer_section(features_repo: str, num_checkpoints: int) -> str:
    """The section ``TRAKHFTrainer`` adds to a trained model's card, linking its features repo."""
    return jinja2.Template(_template("trainer_section.md")).render(
        features_repo=features_repo, num_checkpoints=num_checkpoints
    )
