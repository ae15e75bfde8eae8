"""Mistakes a user can fix, by kind. Every kind is a `GeosocError` (the CLI prints it as one `error:` line, no
traceback) and also the built-in exception a Python user would catch for it: a missing cube is a
`FileNotFoundError`, a malformed catalog a `ValueError`, a refused write a `PermissionError`."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none (for one-line errors)."""
    text = str(err)
    return text.splitlines()[0] if text else type(err).__name__


class GeosocError(Exception):
    """Bad input or environment: the message says which file/key/value and what was expected."""


class CatalogError(GeosocError, ValueError):
    """A catalog that cannot be read or does not validate: the file, the key and what is allowed."""


class InputError(GeosocError, ValueError):
    """An option, argument or input table that is out of range, malformed or too small for the step."""


class NotFoundError(GeosocError, FileNotFoundError):
    """Nothing at a URL where a step expects a file, cube, SampleSet, model or map."""


class DamagedError(GeosocError, ValueError):
    """A file that is there but cannot be trusted: truncated, hand-edited, a checksum mismatch, foreign content."""


class IncompatibleError(GeosocError, ValueError):
    """Two artefacts that do not belong together: a model and a cube with other bands, a store from another run."""


class UnwritableError(GeosocError, PermissionError):
    """A place that refuses writes: a read-only folder, a missing bucket, no credentials to write."""


class LockedError(GeosocError, RuntimeError):
    """Another run holds the lock of the artefact this one would write."""


class IncompleteError(GeosocError, RuntimeError):
    """A run that ended with parts still missing; running it again completes them."""


class ServiceError(GeosocError, ConnectionError):
    """A remote service (Earth Engine, a Dask scheduler) that cannot be reached or refused a request."""


class CredentialsError(GeosocError, PermissionError):
    """No usable credentials for a remote service."""


class MissingExtraError(GeosocError, ImportError):
    """A step that needs an optional part of geosoc that is not installed: the message names the extra."""


# Top-level modules of the optional parts (pyproject's extras), so a missing one names what to install.
EXTRAS = {"ray": "ray", "ee": "ee", "xee": "ee", "s3fs": "cloud", "gcsfs": "cloud", "distributed": "distributed"}


def missing_extra(err: ImportError) -> MissingExtraError | None:
    """The error to show for an import of an optional part that failed, or None where `err` is no such import.
    Its cause is looked at too: fsspec raises its own ImportError ("Install s3fs to access S3") from the one
    that names the module."""
    cause: BaseException | None = err
    while cause is not None:
        module = (getattr(cause, "name", None) or "").split(".")[0]
        if module in EXTRAS:
            return MissingExtraError(f"this step needs {module!r}, which is not installed: "
                                     f"pip install 'geosoc[{EXTRAS[module]}]'")
        cause = cause.__cause__
    return None
