"""A feature store on the Hub: a dataset repo holding the store's files as they are on disk."""

from typing import Optional

from .card import write_dataset_card
from .store import FeatureStore


def push_store(
    store: FeatureStore,
    repo_id: str,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload TRAK features with hf_trak",
    revision: Optional[str] = None,
) -> str:
    """Upload a complete store (features, kernels, scores, card) as a dataset repo; returns the commit URL."""
    from huggingface_hub import HfApi

    if not store.is_complete():
        raise ValueError("The featurization is incomplete: finish featurize(...) before pushing.")
    write_dataset_card(store, repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=store.root,
        commit_message=commit_message,
        revision=revision,
        ignore_patterns=["*.tmp-*", ".parts/*"],
    )
    return commit.commit_url


def download_store(
    repo_id: str, revision: Optional[str] = None, token: Optional[str] = None, cache_dir: Optional[str] = None
) -> str:
    """The local folder (in the HF cache) of a features repo pushed with ``push_store``."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, repo_type="dataset", revision=revision, token=token, cache_dir=cache_dir)
