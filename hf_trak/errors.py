"""The errors hf_trak raises for what a user can fix; each message names the fix.

Every class derives from ``TRAKError`` and from the builtin that fits, so ``except
ValueError`` keeps working::

    TRAKError
    ├── InvalidArgumentError (ValueError)   a setting or call argument out of range (proj_dim=0, k=-3)
    ├── InvalidInputError (ValueError)      a bad row: label out of the head's range, NaN/inf, too long
    ├── StoreMismatchError (ValueError)     stored features vs. the split, model or settings given
    ├── CorruptStoreError (OSError)         an unreadable or altered shard or kernel file
    ├── OutputExistsError (FileExistsError) an output (or a store) that would be overwritten
    ├── HubError (OSError)                  push/download failed: network, auth, missing repo
    └── MissingDependencyError (ImportError) an optional package a feature needs (gradio, peft, faiss...)

The command line prints them as one line (``hf-trak: error: ...``): exit status 2 for
``InvalidArgumentError`` (usage), 1 for the others.
"""

__all__ = [
    "CorruptStoreError",
    "HubError",
    "InvalidArgumentError",
    "InvalidInputError",
    "MissingDependencyError",
    "OutputExistsError",
    "StoreMismatchError",
    "TRAKError",
]


class TRAKError(Exception):
    """Base class of hf_trak's errors."""


class InvalidArgumentError(TRAKError, ValueError):
    """A setting or argument out of its range or of the wrong type."""


class InvalidInputError(TRAKError, ValueError):
    """A row of a split that cannot be attributed as it is (its column, row and value are named)."""


class StoreMismatchError(TRAKError, ValueError):
    """Stored features paired with something they were not made from (split, model, settings)."""


class CorruptStoreError(TRAKError, OSError):
    """A store file that cannot be read or does not match its recorded checksum."""


class OutputExistsError(TRAKError, FileExistsError):
    """An output that exists and would be overwritten (pass ``overwrite``)."""


class HubError(TRAKError, OSError):
    """The Hub could not be reached or refused the request."""


class MissingDependencyError(TRAKError, ImportError):
    """An optional package that the feature asked for needs (the message names the ``pip install``)."""


def check_positive_int(name: str, value) -> int:
    """``value`` if it is an int > 0 (not a bool), else ``InvalidArgumentError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}.")
    return value
