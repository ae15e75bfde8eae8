"""Short content fingerprints: what identifies a build, a map, a fold assignment or an evaluation campaign, so a
re-run resumes its own work and never another's."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path


def fingerprint(*parts: bytes | str, length: int = 16) -> str:
    """The first `length` hex digits of the SHA-256 of `parts`, in order (text as UTF-8)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()[:length]



@functools.cache
def model_code() -> str:
    """A fingerprint of the code that turns samples into held-out predictions (geosoc.learn, geosoc.stats and the
    sample reader): an evaluation run made by other code is not reused, whatever the version number says."""
    package = Path(__file__).parent
    files = sorted([*package.glob("learn/**/*.py"), *package.glob("stats/*.py"), package / "data" / "streaming.py"])
    return fingerprint(*(f"{f.relative_to(package)}\n".encode() + f.read_bytes() for f in files))
