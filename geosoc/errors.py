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
