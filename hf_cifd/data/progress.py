"""Progress bars with samples/s and ``max_samples`` limits for streaming loops."""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for key in ("sample_key", "pixel_values", "labels", "input_ids"):
            if key in batch:
                return len(batch[key])
    try:
        return len(batch)
    except TypeError:
        return 1


def iter_with_progress(batches: Iterable[Any], *, desc: str = "data", max_samples: int | None = None,
                       disable: bool = False) -> Iterator[Any]:
    """Yields ``batches`` (dicts of the batch contract, or lists) until ``max_samples`` samples were yielded,
    showing a tqdm bar counting samples (so its rate is samples/s)."""
    from tqdm.auto import tqdm

    seen = 0
    with tqdm(desc=desc, unit="samples", total=max_samples, disable=disable, dynamic_ncols=True, mininterval=1.0) as bar:
        for batch in batches:
            n = _batch_size(batch)
            yield batch
            seen += n
            bar.update(n)
            if max_samples is not None and seen >= max_samples:
                return


def take_samples(samples: Iterable[Any], max_samples: int | None) -> Iterator[Any]:
    return iter(samples) if max_samples is None else itertools.islice(samples, max_samples)
