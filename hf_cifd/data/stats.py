"""Stream position and bad-record counters in the training process; exact resumption of streamed datasets.

Why not datasets' ``IterableDataset.state_dict()`` / accelerate's stateful dataloader (transformers 5.23,
accelerate 1.15, datasets 5.2, read from their sources):

* ``Trainer`` never saves a dataloader state: on resume it replays ``skip_first_batches`` (re-decoding and
  re-transforming every skipped batch), and ``accelerator_config={"use_stateful_dataloader": True}`` needs
  ``torchdata``'s ``StatefulDataLoader`` (not installed here) and is only saved by ``accelerator.save_state``, which
  Trainer does not call for the dataloader.
* ``datasets``' ``IterableDataset.state_dict()`` drops the content of the shuffle buffer
  (``BufferShuffledExamplesIterable`` restores only the position of the underlying stream), so a resumed run with a
  shuffle buffer silently skips up to ``buffer_size`` records per worker; and with DataLoader workers the state lives
  in the worker processes.

What we do instead: every sample carries ``(worker id, worker-local raw position)`` (the ``with_indices`` index of the
processing ``map``, counted *before* bad-record filtering), :class:`StreamTracker` keeps the latest position of each
worker from the batches the training loop actually consumed, :class:`StreamResumeCallback` writes it to
``checkpoint-N/stream_state_rank{R}.json`` on every save and, on resume, hands the positions to the dataset's
:class:`~hf_cifd.data.loading.RecordProcessor`, which skips the already consumed raw records *without decoding them*.
The raw order is deterministic (seeded shard order, seeded shuffle buffer, fixed shard -> process -> worker split),
so this is exact with any shuffle buffer, any number of workers and processes, as long as the resumed run uses the
same seed, number of processes and of DataLoader workers (checked). The data epoch is saved too and re-applied
(Trainer restarts its epoch counter at 0 for an ``IterableDataset``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from ..checks import DistillationInputError
from .collate import STREAM_STATE_KEY

logger = logging.getLogger(__name__)

STATE_FILE = "stream_state_rank{rank}.json"


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + int(v)
    return out


class StreamTracker:
    """Latest ``(position, counters)`` per DataLoader worker of this process, from consumed batches."""

    def __init__(self):
        self.epoch = 0
        self.latest: dict[int, dict[str, Any]] = {}
        self.base: dict[int, dict[str, Any]] = {}
        self.finished: dict[str, int] = {}

    def observe(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Pops ``batch["stream_state"]`` (added by :func:`~hf_cifd.data.collate`) and records it; returns batch."""
        state = batch.pop(STREAM_STATE_KEY, None) if isinstance(batch, dict) else None
        for worker, st in (state or {}).items():
            worker = int(worker)
            old = self.latest.get(worker)
            if old is None or st["pos"] >= old["pos"]:
                self.latest[worker] = {"pos": int(st["pos"]), "counts": dict(st["counts"])}
        return batch

    def positions(self) -> dict[int, int]:
        pos = {w: s["pos"] for w, s in self.base.items()}
        pos.update({w: s["pos"] for w, s in self.latest.items()})
        return pos

    def epoch_counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for w in set(self.base) | set(self.latest):
            total = _add(total, self.base.get(w, {}).get("counts", {}))
            total = _add(total, self.latest.get(w, {}).get("counts", {}))
        return total

    def counts(self) -> dict[str, int]:
        """Records seen / bad by reason in this process, all epochs so far."""
        return _add(self.finished, self.epoch_counts())

    def global_counts(self) -> dict[str, int]:
        """:meth:`counts` summed over all processes (collective call when torch.distributed is initialised)."""
        mine = self.counts()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, mine)
            total: dict[str, int] = {}
            for g in gathered:
                total = _add(total, g)
            return total
        return mine

    def end_epoch(self) -> None:
        self.finished = self.counts()
        self.latest, self.base = {}, {}
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        workers = {}
        for w in set(self.base) | set(self.latest):
            counts = _add(self.base.get(w, {}).get("counts", {}), self.latest.get(w, {}).get("counts", {}))
            workers[str(w)] = {"pos": self.positions()[w], "counts": counts}
        return {"epoch": self.epoch, "workers": workers, "finished": dict(self.finished)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.base = {int(w): {"pos": int(s["pos"]), "counts": dict(s["counts"])} for w, s in state["workers"].items()}
        self.latest = {}
        self.finished = dict(state.get("finished", {}))


def save_stream_state(tracker: StreamTracker, checkpoint_dir: str, *, rank: int = 0, world_size: int = 1,
                      num_workers: int = 0) -> str:
    os.makedirs(checkpoint_dir, exist_ok=True)
    path = os.path.join(checkpoint_dir, STATE_FILE.format(rank=rank))
    data = dict(tracker.state_dict(), world_size=world_size, num_workers=num_workers)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_stream_state(tracker: StreamTracker, checkpoint_dir: str, *, rank: int = 0, world_size: int = 1,
                      num_workers: int = 0, processor=None) -> bool:
    """Restores ``tracker`` (and the processor's resume positions) from a checkpoint; False if it has no state."""
    path = os.path.join(checkpoint_dir, STATE_FILE.format(rank=rank))
    if not os.path.exists(path):
        return False
    with open(path) as f:
        data = json.load(f)
    if data.get("world_size", world_size) != world_size or data.get("num_workers", num_workers) != num_workers:
        raise DistillationInputError(
            f"{path} was saved with {data.get('world_size')} process(es) x {data.get('num_workers')} DataLoader "
            f"worker(s); this run has {world_size} x {num_workers}. A stream position is only valid for the same "
            "split of shards: resume with the same number of processes and dataloader_num_workers (and seed)."
        )
    tracker.load_state_dict(data)
    if processor is not None:
        processor.resume_positions = tracker.positions()
    return True


try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object


class StreamResumeCallback(TrainerCallback):
    """Saves the stream position in every checkpoint and restores it on resume (see the module docstring).

    Needs the training loop to feed consumed batches to ``self.tracker.observe(batch)`` (see
    :class:`StreamTrackingMixin`) and sets ``args.ignore_data_skip=True`` (the position replaces Trainer's replay of
    skipped batches; skipping both would drop data).
    """

    def __init__(self, tracker: StreamTracker | None = None, dataset=None):
        self.tracker = tracker or StreamTracker()
        self.dataset = dataset
        self.processor = None
        # Set by DistillationTrainer.train(resume_from_checkpoint=...): the checkpoint being resumed, wherever it is
        # (default: output_dir/checkpoint-<step>); a missing state file there is an error unless not required.
        self.resume_dir: str | None = None
        self.resume_required = False
        self.resume_skip = False
        self._saved_step = -1

    def _rank_world(self, args) -> tuple[int, int]:
        return int(getattr(args, "process_index", 0)), int(getattr(args, "world_size", 1))

    def on_init_end(self, args, state, control, **kwargs):
        if not args.ignore_data_skip:
            logger.info("StreamResumeCallback: setting ignore_data_skip=True (the stream position is restored instead)")
            args.ignore_data_skip = True

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        from .loading import find_processor

        self.processor = find_processor(self.dataset) or find_processor(getattr(train_dataloader, "dataset", None))
        if int(getattr(args, "world_size", 1)) > 1 and type(train_dataloader).__name__ == "DataLoaderDispatcher":
            raise DistillationInputError(
                "the streamed train dataset is dispatched from rank 0 (accelerate's default for an IterableDataset): "
                "every process would decode nothing itself, and list fields such as sample_key are not split. Set "
                "accelerator_config={'dispatch_batches': False} so each process streams its own shards."
            )
        if train_dataloader is not None and not getattr(train_dataloader, "_hf_cifd_epoch_patched", False):
            original = train_dataloader.set_epoch
            tracker = self.tracker

            def set_epoch(_epoch, _original=original):  # Trainer's counter restarts at 0 on resume: use ours
                _original(tracker.epoch)

            train_dataloader.set_epoch = set_epoch
            train_dataloader._hf_cifd_epoch_patched = True
        if state.global_step > 0 and self.resume_skip:
            logger.warning("resume_partial: the stream restarts at the beginning of data epoch %d", self.tracker.epoch)
        elif state.global_step > 0:
            ckpt = self.resume_dir or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            rank, world = self._rank_world(args)
            state_file = os.path.join(ckpt, STATE_FILE.format(rank=rank))
            if self.resume_required and not os.path.isfile(state_file):
                raise DistillationInputError(
                    f"{state_file} is missing: without it the stream would restart at its first sample and repeat "
                    "data. Restore the file, resume from another checkpoint, or set resume_partial=True.")
            if load_stream_state(self.tracker, ckpt, rank=rank, world_size=world,
                                 num_workers=args.dataloader_num_workers, processor=self.processor):
                if not args.ignore_data_skip:
                    raise DistillationInputError(
                        "StreamResumeCallback restores the stream position, but ignore_data_skip=False makes Trainer "
                        "skip the same batches again. Pass the callback to Trainer(callbacks=[...]) at construction "
                        "or set ignore_data_skip=True."
                    )
                if self.processor is None:
                    raise DistillationInputError(
                        "StreamResumeCallback found a saved stream position but the train dataset was not built by "
                        "hf_cifd.data.load_image_dataset, so it cannot be fast-forwarded."
                    )
                logger.info("resuming the stream at data epoch %d, positions %s", self.tracker.epoch,
                            self.tracker.positions())

    def on_epoch_end(self, args, state, control, **kwargs):
        self.tracker.end_epoch()
        if self.processor is not None:
            self.processor.resume_positions = {}

    def save(self, args, state, checkpoint_dir: str) -> None:
        rank, world = self._rank_world(args)
        save_stream_state(self.tracker, checkpoint_dir, rank=rank, world_size=world,
                          num_workers=args.dataloader_num_workers)
        self._saved_step = state.global_step

    def on_save(self, args, state, control, **kwargs):
        if self._saved_step != state.global_step:  # DistillationTrainer saved it before marking the checkpoint complete
            self.save(args, state, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


class StreamTrackingMixin:
    """Mix into a ``transformers.Trainer`` subclass (before Trainer in the bases): feeds every consumed batch to the
    :class:`StreamResumeCallback`'s tracker and strips the stream metadata before the model sees the batch."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        trackers = [cb.tracker for cb in self.callback_handler.callbacks if isinstance(cb, StreamResumeCallback)]
        for batch in batch_samples:
            state = batch.pop(STREAM_STATE_KEY, None) if isinstance(batch, dict) else None
            for t in trackers:
                t.observe({STREAM_STATE_KEY: state})
        return batch_samples, num_items
