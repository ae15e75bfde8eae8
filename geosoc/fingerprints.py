"""Short content fingerprints: what identifies a build, a map, a fold assignment or an evaluation campaign, so a
re-run resumes its own work and never another's."""

from __future__ import annotations

import hashlib


def fingerprint(*parts: bytes | str, length: int = 16) -> str:
    """The first `length` hex digits of the SHA-256 of `parts`, in order (text as UTF-8)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()[:length]

