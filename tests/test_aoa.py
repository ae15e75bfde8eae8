"""The AOA's nearest-training-sample distance, as a map computes it (the reference side prepared once)."""

from __future__ import annotations

import numpy as np
import torch

from geosoc.stats import aoa


def test_distances_with_the_reference_prepared_once_are_torch_cdists_to_the_bit() -> None:
    """A map scores every window against one reference: preparing it once (`_padded`) must not change a distance,
    at any query count (blocks of _CHUNK rows, a last partial block, fewer rows than cdist's direct rule)."""
    rng = np.random.default_rng(0)
    reference = torch.from_numpy(rng.normal(size=(300, 24)).astype(np.float32))
    padded = aoa._padded(reference)
    for rows in (1, 7, aoa._DIRECT + 1, aoa._CHUNK + 13):
        queries = torch.from_numpy(rng.normal(size=(rows, 24)).astype(np.float32))
        torch.testing.assert_close(aoa._distances(queries, padded), torch.cdist(queries, reference), rtol=0, atol=0)
        groups = torch.from_numpy(rng.integers(0, 3, rows))
        reference_groups = torch.from_numpy(rng.integers(0, 3, len(reference)))
        block = torch.cdist(queries, reference).masked_fill(groups[:, None] == reference_groups[None, :], float("inf"))
        direct = torch.linalg.vector_norm(queries - reference[block.argmin(dim=1)], dim=1)  # as before `_padded`
        torch.testing.assert_close(aoa._nearest(queries, reference, groups, reference_groups, padded=padded), direct,
                                   rtol=0, atol=0)
