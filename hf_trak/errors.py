"""The errors hf_trak raises for what a user can fix; each message names the fix.

Every error that a user's input, settings or files can cause is one of these (a test walks every
``raise`` in the package). Each class derives from ``TRAKError`` and from the builtin that fits, so
``except ValueError`` or ``except FileNotFoundError`` keeps working::

    TRAKError
    ├── InvalidArgumentError (ValueError)        a setting or argument out of range or of the wrong kind
    ├── InvalidInputError (ValueError)           a bad row or split: a label out of the head's range, NaN/inf,
    │                                            too long, a missing column, an empty split
    ├── StoreMismatchError (ValueError)          stored features vs. the split, model, checkpoints or settings
    ├── IncompleteStoreError (ValueError)        a store whose featurization did not finish, or that lacks files
    ├── StoreLockedError (RuntimeError)          a store another process is featurizing, waited for too long
    ├── CorruptStoreError (OSError)              an unreadable or altered store file
    ├── NotFoundError (FileNotFoundError)        a model, checkpoint, store or folder that does not exist
    ├── OutputExistsError (FileExistsError)      an output (or a store) that would be overwritten
    ├── OutputNotWritableError (PermissionError) an output in a folder that cannot be written to
    ├── DiskFullError (OSError)                  no space left on the device while writing a store file
    ├── NotFeaturizedError (RuntimeError)        a call that needs train features before there are any
    ├── ProcessFailedError (RuntimeError)        another process of a launch ended: this one stops, named
    ├── HubError (OSError)                       push/download failed: network, auth, missing repo
    └── MissingDependencyError (ImportError)     an optional package a feature needs (gradio, peft, faiss...)

The command line prints them as one line (``hf-trak: error: ...``): exit status 2 for
``InvalidArgumentError`` (a bad option or setting), 1 for the others (a failure).
"""

__all__ = [
    "CorruptStoreError",
    "DiskFullError",
    "HubError",
    "IncompleteStoreError",
    "InvalidArgumentError",
    "InvalidInputError",
    "MissingDependencyError",
    "NotFeaturizedError",
    "NotFoundError",
    "OutputExistsError",
    "OutputNotWritableError",
    "ProcessFailedError",
    "StoreLockedError",
    "StoreMismatchError",
    "TRAKError",
]


class TRAKError(Exception):
    """Base class of hf_trak's errors."""


class InvalidArgumentError(TRAKError, ValueError):
    """A setting or argument out of its range or of the wrong kind (the command line's usage error, exit 2)."""


class InvalidInputError(TRAKError, ValueError):
    """A row or split that cannot be attributed as it is (its column, row and value are named)."""


class StoreMismatchError(TRAKError, ValueError):
    """Stored features paired with something they were not made from (split, model, checkpoints, settings)."""


class IncompleteStoreError(TRAKError, ValueError):
    """A store whose featurization did not finish (resume it), or a copy that lacks some of its files."""


class StoreLockedError(TRAKError, RuntimeError):
    """A store that another process is featurizing (its owner is named), waited for longer than allowed."""


class CorruptStoreError(TRAKError, OSError):
    """A store file that cannot be read or does not match its recorded checksum."""


class NotFoundError(TRAKError, FileNotFoundError):
    """A model, checkpoint, store or folder named as input or output that does not exist."""


class OutputExistsError(TRAKError, FileExistsError):
    """An output that exists and would be overwritten (pass ``overwrite``)."""


class OutputNotWritableError(TRAKError, PermissionError):
    """An output whose folder cannot be written to."""


class DiskFullError(TRAKError, OSError):
    """No space left on the device while writing a file (named, with the space the store needs); nothing
    half-written is kept, and a rerun with space resumes."""


class NotFeaturizedError(TRAKError, RuntimeError):
    """A call that needs train features (``featurize`` or ``from_pretrained`` first)."""


class ProcessFailedError(TRAKError, RuntimeError):
    """Another process of a launch ended (or a collective failed for it): this one stops; a rerun resumes."""


class HubError(TRAKError, OSError):
    """The Hub could not be reached or refused the request."""


class MissingDependencyError(TRAKError, ImportError):
    """An optional package that the feature asked for needs (the message names the ``pip install``)."""


def check_positive_int(name: str, value) -> int:
    """``value`` if it is an int > 0 (not a bool), else ``InvalidArgumentError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}.")
    return value
