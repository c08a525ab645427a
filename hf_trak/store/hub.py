"""A feature store on the Hub: a dataset repo holding the store's files as they are on disk.

Pushing never changes the local store before the Hub has the commit: the dataset card
naming the repo is uploaded from memory and written locally only once the push succeeded.
A failure (network, authentication, missing repo) is a ``HubError`` that names its cause.
"""

import os
from typing import Optional

from hf_trak.errors import HubError, IncompleteStoreError
from hf_trak.store.card import render_dataset_card, write_dataset_card
from hf_trak.store.feature_store import FeatureStore

CARD_NAME = "README.md"


def hub_failure(action: str, error: Exception) -> HubError:
    """A one-line ``HubError`` for a failed Hub request, naming the cause and its fix."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    while error.__cause__ is not None and type(error) in (RuntimeError, ValueError, OSError):
        error = error.__cause__  # the client wraps the failed request ("Error while uploading ...")
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, RepositoryNotFoundError) or status == 404:
        cause = "the repository does not exist or the token cannot see it"
    elif status in (401, 403):
        cause = (
            f"the Hub refused the token (HTTP {status}): pass a token with write access (--token or `hf auth login`)"
        )
    elif isinstance(error, HfHubHTTPError):
        cause = f"the Hub answered HTTP {status}: {str(error).splitlines()[0]}"
    elif any(word in type(error).__name__ for word in ("Connect", "Timeout", "Network", "Offline")):
        cause = f"the Hub at {constants.ENDPOINT} cannot be reached ({type(error).__name__}: {error})"
    else:
        cause = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return HubError(f"{action} failed: {cause}.")


def push_store(
    store: FeatureStore,
    repo_id: str,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload TRAK features with hf_trak",
    revision: Optional[str] = None,
) -> str:
    """Upload a complete store (features, kernels, scores, card) as a dataset repo, in one commit; returns
    the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if not store.is_complete():
        raise IncompleteStoreError("The featurization is incomplete: finish featurize(...) before pushing.")
    card = str(render_dataset_card(store, repo_id))
    operations = [CommitOperationAdd(CARD_NAME, card.encode())]
    for folder, _, names in os.walk(store.root):
        for name in sorted(names):
            path = os.path.join(folder, name)
            in_repo = os.path.relpath(path, store.root).replace(os.sep, "/")
            if name.startswith(".") or in_repo == CARD_NAME:
                continue  # temporary files of an interrupted write; the card is uploaded from memory
            operations.append(CommitOperationAdd(in_repo, path))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        commit = api.create_commit(
            repo_id, operations, commit_message=commit_message, repo_type="dataset", revision=revision
        )
    except Exception as error:  # every client error (HTTP, network, auth) becomes one named cause
        raise hub_failure(f"Pushing {store.root} to {repo_id}", error) from error
    write_dataset_card(store, repo_id)
    return commit.commit_url


def download_store(
    repo_id: str, revision: Optional[str] = None, token: Optional[str] = None, cache_dir: Optional[str] = None
) -> str:
    """The local folder (in the HF cache) of a features repo pushed with ``push_store``."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, repo_type="dataset", revision=revision, token=token, cache_dir=cache_dir)
    except Exception as error:
        raise hub_failure(f"Downloading the features repo {repo_id}", error) from error
