"""Data at scale: streamed datasets for classification / image-text, collation, bad-record accounting, exact
stream resumption in Trainer checkpoints, and the teacher-output cache.

Public API:

* :func:`load_image_dataset` (+ :class:`RecordProcessor`, :class:`MapStyleImageDataset`, :data:`PRESETS`,
  :func:`read_bad_records`, :func:`find_processor`)
* :func:`collate` (batch contract; ``stream_state`` metadata), :func:`drop_stream_state`
* :class:`StreamTracker`, :class:`StreamResumeCallback`, :class:`StreamTrackingMixin`,
  :func:`save_stream_state`, :func:`load_stream_state`
* :func:`cache_teacher_outputs` -> :class:`CacheReport`, :class:`TeacherCache`, :class:`CachedTeacherCollator`
* :func:`iter_with_progress`
"""

from .cache import CachedTeacherCollator, CacheReport, TeacherCache, cache_teacher_outputs
from .collate import STREAM_STATE_KEY, collate, drop_stream_state
from .loading import (
    BAD_REASONS,
    PRESETS,
    MapStyleImageDataset,
    RecordProcessor,
    find_processor,
    load_image_dataset,
    read_bad_records,
)
from .progress import iter_with_progress, take_samples

_LAZY = {"StreamResumeCallback", "StreamTracker", "StreamTrackingMixin", "load_stream_state", "save_stream_state"}


def __getattr__(name):  # stats imports transformers (~4 s): only when asked for
    if name in _LAZY:
        from . import stats

        return getattr(stats, name)
    raise AttributeError(f"module 'hf_cifd.data' has no attribute {name!r}")

__all__ = [
    "BAD_REASONS", "PRESETS", "STREAM_STATE_KEY", "CacheReport", "CachedTeacherCollator", "MapStyleImageDataset",
    "RecordProcessor", "StreamResumeCallback", "StreamTracker", "StreamTrackingMixin", "TeacherCache",
    "cache_teacher_outputs", "collate", "drop_stream_state", "find_processor", "iter_with_progress",
    "load_image_dataset", "load_stream_state", "read_bad_records", "save_stream_state", "take_samples",
]
