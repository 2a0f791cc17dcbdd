"""Teacher-output cache: run the teacher once, store embeddings (+ logits) per sample key, read them by memory map.

Layout of ``output_dir``::

    cache_info.json                 teacher name, dtype, shard_size, fields {name: width}
    shards/shard-000012.arrow       map-style datasets: global sample indices [12*S, 13*S)
    shards/shard-w2r1-000003.arrow  iterable datasets: 4th block of S samples of rank 1's stream (2 processes)

Each shard is an uncompressed Arrow IPC file (memory-mappable) with a ``sample_key`` string column and one
``fixed_size_list<float16|float32>`` column per field (``teacher_image_embedding``, ``teacher_text_embedding``,
``teacher_logits``). A shard is written to a temporary name, fsynced and renamed, so a file with the final name is
always complete.

Integrity: ``cache_info.json`` holds a ``fingerprint`` of the teacher (architecture, SHA-256 of its weights, its
preprocessing); a trainer given both a teacher and a cache refuses a cache written by another teacher. Each shard has a
checksum entry ``shards/<shard>.sha256`` (SHA-256, bytes, rows; written after the shard; rank 0 also collects them
under ``shards`` in ``cache_info.json``): the reader refuses a shard that fails it, naming the shard, and the writer
re-does a shard that is truncated, altered or has no entry. Non-finite teacher outputs are refused at write time,
naming the sample key.

Parallel writing and resumption: the assignment of samples to shards is deterministic (map-style: by index, shard j
belongs to rank ``j % world_size``; iterable: each rank's own ``datasets`` sub-stream (or every world_size-th
sample) cut into blocks of ``shard_size``). A re-run with the same dataset and settings skips the shards whose file
exists, so a crashed run only recomputes the unfinished shards, and the result is identical, bit for bit, to an
uninterrupted run: the teacher always sees the same batches (batches never straddle shards).

What a cache holds: the teacher's outputs for ONE view per sample, the one its dataset gives (``hf-cifd
cache-teacher`` and the recipes use the teacher's evaluation transform: the un-augmented centre crop). A training run
reading the cache therefore pairs the student's augmented view with the teacher's un-augmented one; that is the
cache's trade (CKD's reduced-teacher-inference setting is built on it), unlike a live teacher, which sees the very
view the student sees (:mod:`hf_cifd.data.views`). The trainer logs this when it uses a cache.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..checks import DistillationInputError
from .collate import collate as default_collate

logger = logging.getLogger(__name__)

CACHE_INFO = "cache_info.json"
SHARD_DIR = "shards"
FORMAT_VERSION = 1
_END = object()
_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class CacheReport:
    """What :func:`cache_teacher_outputs` did. Counts cover all processes when an ``accelerator`` is given."""

    output_dir: str
    num_samples: int
    teacher_calls: int
    bytes_per_sample: float
    skipped_shards: int
    written_shards: int
    fields: dict[str, int] = field(default_factory=dict)
    dtype: str = "float16"
    seconds: float = 0.0
    skipped_records: int = 0

    def projected_bytes(self, num_samples: int = 12_000_000) -> float:
        return self.bytes_per_sample * num_samples

    def summary(self) -> str:
        widths = ", ".join(f"{k}={v}" for k, v in self.fields.items())
        return (
            f"teacher cache {self.output_dir}: {self.num_samples} samples, {self.teacher_calls} teacher calls "
            f"(samples forwarded) in {self.seconds:.1f}s, {self.skipped_shards} finished shard(s) reused, "
            f"{self.written_shards} written; fields {widths} as {self.dtype}; "
            f"{self.bytes_per_sample:.0f} bytes/sample -> {_human(self.projected_bytes())} for 12M samples"
        )


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _dist_info(accelerator) -> tuple[int, int, torch.device]:
    if accelerator is not None:
        return accelerator.process_index, accelerator.num_processes, accelerator.device
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.device("cpu")
    return 0, 1, torch.device("cpu")


def _teacher_name(teacher) -> str:
    for attr in ("name_or_path",):
        cfg = getattr(teacher, "config", None)
        if cfg is not None and getattr(cfg, "_name_or_path", None):
            return str(cfg._name_or_path)
    cfg = getattr(teacher, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg.get("hf_hub_id") or cfg["architecture"])
    return f"{type(teacher).__module__}.{type(teacher).__qualname__}"


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _checksum_path(shard_path: str) -> str:
    return shard_path[: -len(".arrow")] + ".sha256"


def _shard_problem(shard_path: str) -> str | None:
    """Why a shard file cannot be trusted (no checksum entry, other size, other SHA-256), or None."""
    entry = _checksum_path(shard_path)
    if not os.path.isfile(entry):
        return "has no checksum entry (its write was interrupted, or an older hf_cifd wrote it)"
    with open(entry) as f:
        want = json.load(f)
    size = os.path.getsize(shard_path)
    if size != want["bytes"]:
        return f"is truncated or altered ({size} bytes, {want['bytes']} written)"
    if _sha256(shard_path) != want["sha256"]:
        return "fails its SHA-256 checksum (its bytes changed after it was written)"
    return None


def teacher_fingerprint(teacher, preprocessing: str | None = None, name: str | None = None) -> dict[str, Any]:
    """What identifies a teacher's outputs: architecture name, SHA-256 of its weights (parameters and buffers, in
    name order) and its preprocessing (repr of the transform applied to its inputs, when known)."""
    h = hashlib.sha256()
    for key, t in sorted(teacher.state_dict().items()):
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"architecture": name or _teacher_name(teacher), "weights_sha256": h.hexdigest(),
            "preprocessing": preprocessing}


def _preprocessing(dataset) -> str | None:
    from .loading import find_processor

    processor = find_processor(dataset)
    if processor is None:
        return None
    transform = getattr(processor, "teacher_transform", None) or getattr(processor, "transform", None)
    if transform is None:
        return None
    if hasattr(transform, "__qualname__"):  # a function: its name (its repr holds a memory address)
        return f"{getattr(transform, '__module__', '')}.{transform.__qualname__}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def _write_shard(path: str, keys: list[str], arrays: dict[str, np.ndarray], meta: dict[str, str], rank: int) -> int:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    cols = {"sample_key": pa.array(keys, type=pa.string())}
    for name, arr in arrays.items():
        width = arr.shape[1]
        cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), width)
    table = pa.table(cols).replace_schema_metadata(meta)
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.tmp-r{rank}-{os.getpid()}")
    with pa.OSFile(tmp, "wb") as sink:
        with ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    size = os.path.getsize(path)
    _atomic_write_bytes(_checksum_path(path), json.dumps({"sha256": _sha256(path), "bytes": size,
                                                          "rows": len(keys)}).encode())
    return size


class _ShardPlan:
    """Which shards this rank owns, which are finished, and the raw sample stream of the pending ones."""

    def __init__(self, names: Iterable[str], sizes: Iterable[int] | None, samples: Iterator[Any], skipped: int):
        self.names = names
        self.sizes = sizes  # raw samples per pending shard (None: fixed shard_size, until the stream ends)
        self.samples = samples
        self.skipped = skipped


def _is_map_style(dataset) -> bool:
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return False
    try:
        import datasets

        if isinstance(dataset, datasets.IterableDataset):
            return False
    except ImportError:  # pragma: no cover
        pass
    return hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")


def _list_collate(samples):
    return samples


def _plan(dataset, shard_dir, rank, world, shard_size, max_samples, batch_size, num_workers) -> _ShardPlan:
    if _is_map_style(dataset):
        n = len(dataset) if max_samples is None else min(len(dataset), int(max_samples))
        n_shards = math.ceil(n / shard_size)
        owned = [j for j in range(n_shards) if j % world == rank]
        pending = [j for j in owned if not _reusable(os.path.join(shard_dir, f"shard-{j:06d}.arrow"))]
        indices = [i for j in pending for i in range(j * shard_size, min(n, (j + 1) * shard_size))]
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers, collate_fn=_list_collate
        )
        samples = (s for chunk in loader for s in chunk)
        sizes = [min(n, (j + 1) * shard_size) - j * shard_size for j in pending]
        return _ShardPlan([f"shard-{j:06d}" for j in pending], sizes, samples, len(owned) - len(pending))

    # Iterable: this rank's deterministic sub-stream, cut into blocks of shard_size.
    prefix = f"shard-w{world}r{rank}-"
    done = sorted(
        int(m.group(1))
        for p in glob.glob(os.path.join(shard_dir, prefix + "*.arrow"))
        if (m := re.search(r"-(\d{6})\.arrow$", p))
    )
    for j in done:  # a bad shard and every later one of this rank are written again (the stream is re-read in order)
        if not _reusable(os.path.join(shard_dir, f"{prefix}{j:06d}.arrow")):
            for later in done[done.index(j):]:
                for path in (os.path.join(shard_dir, f"{prefix}{later:06d}.arrow"),
                             os.path.join(shard_dir, f"{prefix}{later:06d}.sha256")):
                    if os.path.exists(path):
                        os.remove(path)
            done = done[:done.index(j)]
            break
    if done != list(range(len(done))):
        raise DistillationInputError(
            f"the teacher cache in {shard_dir} has non-contiguous shards for rank {rank} of {world} ({done[:10]}...); "
            "it was written by a different run. Use a new output directory."
        )
    others = [p for p in glob.glob(os.path.join(shard_dir, "shard-w*.arrow")) if not os.path.basename(p).startswith(prefix)]
    if any(not re.match(rf"shard-w{world}r\d+-", os.path.basename(p)) for p in others):
        raise DistillationInputError(
            f"the teacher cache in {shard_dir} was written with a different number of processes; a streamed dataset "
            f"is split per process, so resume it with the same number of processes ({world} now) or use a new "
            "output directory."
        )
    stream = dataset
    try:
        import datasets

        is_hf_iterable = isinstance(dataset, datasets.IterableDataset)
    except ImportError:  # pragma: no cover
        is_hf_iterable = False
    quota = None if max_samples is None else math.ceil(int(max_samples) / world)
    split_by_hand = False
    if world > 1:
        if is_hf_iterable and dataset.n_shards >= world:
            stream = dataset.shard(num_shards=world, index=rank)
        else:
            split_by_hand = True
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=_list_collate)

    def samples():
        count = 0
        for i, s in enumerate(x for chunk in loader for x in chunk):
            if split_by_hand and i % world != rank:
                continue
            if quota is not None and count >= quota:
                return
            count += 1
            yield s

    skip = len(done) * shard_size
    it = samples()
    for _ in range(skip):  # finished shards: iterate the records again, but never run the teacher on them
        if next(it, _END) is _END:
            break

    def names():
        j = len(done)
        while True:
            yield f"{prefix}{j:06d}"
            j += 1

    return _ShardPlan(names(), None, it, len(done))


def _reusable(shard_path: str) -> bool:
    """A finished shard the writer may keep; a bad one is logged and written again."""
    if not os.path.exists(shard_path):
        return False
    problem = _shard_problem(shard_path)
    if problem:
        logger.warning("teacher cache: %s %s: writing it again", shard_path, problem)
    return problem is None


def _read_info(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, CACHE_INFO)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _check_info(old: dict | None, new: dict, output_dir: str) -> None:
    if old is None:
        return
    for key in ("teacher", "fingerprint", "dtype", "shard_size", "fields"):
        if key in old and key in new and old[key] != new[key]:
            raise DistillationInputError(
                f"the teacher cache in {output_dir} was written with {key}={old[key]!r}, this run has "
                f"{key}={new[key]!r}. Resume with the same teacher and settings, or use a new output directory."
            )


def cache_teacher_outputs(
    teacher: torch.nn.Module,
    dataset,
    output_dir: str,
    *,
    adapter=None,
    collate_fn: Callable | None = None,
    batch_size: int = 64,
    shard_size: int = 1024,
    dtype: str = "float16",
    num_workers: int = 0,
    accelerator=None,
    max_samples: int | None = None,
    teacher_name: str | None = None,
    progress: bool = True,
) -> CacheReport:
    """Runs ``teacher`` once over ``dataset`` and stores its outputs per ``sample_key`` under ``output_dir``.

    ``dataset`` yields samples of the batch contract (dicts with ``sample_key`` and the teacher's inputs; ``None``
    samples are skipped), map-style or iterable (e.g. :func:`hf_cifd.data.load_image_dataset` output). Each process
    of an ``accelerator`` writes its own shards; re-running skips finished shards (see the module docstring).
    """
    from ..adapters import adapter_for

    if dtype not in _DTYPES:
        raise DistillationInputError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not (isinstance(value, int) and value > 0):
            raise DistillationInputError(f"{name} must be a positive int, got {value!r}.")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples <= 0):
        raise DistillationInputError(f"max_samples must be a positive int or None, got {max_samples!r}.")
    rank, world, device = _dist_info(accelerator)
    adapter = adapter or adapter_for(teacher)
    collate_fn = collate_fn or default_collate
    np_dtype = _DTYPES[dtype]
    shard_dir = os.path.join(output_dir, SHARD_DIR)
    os.makedirs(shard_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(shard_dir, f".*.tmp-r{rank}-*")):  # left by a killed run of this rank
        os.remove(stale)
    info = {"format_version": FORMAT_VERSION, "teacher": teacher_name or _teacher_name(teacher), "dtype": dtype,
            "shard_size": shard_size,
            "fingerprint": teacher_fingerprint(teacher, _preprocessing(dataset), teacher_name)}
    _check_info(_read_info(output_dir), info, output_dir)

    was_training = teacher.training
    teacher.eval()
    teacher.to(device)
    plan = _plan(dataset, shard_dir, rank, world, shard_size, max_samples, batch_size, num_workers)
    if plan.skipped:
        logger.info("teacher cache: rank %d reuses %d finished shard(s) in %s", rank, plan.skipped, shard_dir)

    from tqdm.auto import tqdm

    bar = tqdm(desc=f"caching teacher outputs (rank {rank})", unit="samples", dynamic_ncols=True,
               disable=not progress or rank != 0, mininterval=1.0)
    t0 = time.time()
    teacher_calls = written = bytes_written = rows_written = skipped_records = 0
    fields: dict[str, int] = {}
    info_written = False

    def run_batch(samples: list, keys: list, arrays: dict[str, list]):
        nonlocal teacher_calls
        batch = collate_fn(samples)
        batch_keys = batch.get("sample_key")
        if batch_keys is None or len(batch_keys) != len(samples):
            raise DistillationInputError(
                "the teacher cache needs a `sample_key` (list of str, one per sample) in every batch; the dataset or "
                "collate_fn did not provide it."
            )
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        with torch.no_grad():
            enc = adapter.encode(teacher, inputs, prefix="teacher_")
        outs = {f"teacher_{m}_embedding": e for m, e in enc.embeddings.items()}
        if enc.logits is not None:
            outs["teacher_logits"] = enc.logits
        for name, t in outs.items():
            arr = t.detach().float().flatten(1).cpu().numpy().astype(np_dtype)
            bad = ~np.isfinite(arr).all(axis=1)  # after the cast: float16 overflow is caught too
            if bad.any():
                where = [str(batch_keys[i]) for i in np.flatnonzero(bad)[:5]]
                raise DistillationInputError(
                    f"the teacher's {name} is non-finite (NaN/inf) as {dtype} for sample(s) {where}: nothing was written "
                    "for them. Check those inputs and the teacher (a diverged or fp16-overflowing model); cache as "
                    "dtype='float32' if float16 overflows.")
            arrays.setdefault(name, []).append(arr)
        keys.extend(str(k) for k in batch_keys)
        teacher_calls += len(samples)
        bar.update(len(samples))

    def finish_shard(name: str, keys: list, arrays: dict[str, list]):
        nonlocal written, bytes_written, rows_written, info_written, fields
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
            raise DistillationInputError(f"duplicate sample keys in the dataset ({dup}); the cache needs unique keys.")
        if not fields and arrays:
            fields = {k: int(v[0].shape[1]) for k, v in arrays.items()}
        if fields and not info_written:
            _check_info(_read_info(output_dir), dict(info, fields=fields), output_dir)
            _atomic_write_bytes(os.path.join(output_dir, CACHE_INFO),
                                json.dumps(dict(info, fields=fields), indent=2).encode())
            info_written = True
        cat = {k: (np.concatenate(arrays[k]) if arrays.get(k) else np.zeros((0, w), np_dtype)) for k, w in fields.items()}
        meta = {"hf_cifd_cache": json.dumps(dict(info, fields=fields))}
        bytes_written += _write_shard(os.path.join(shard_dir, name + ".arrow"), keys, cat, meta, rank)
        rows_written += len(keys)
        written += 1

    try:
        names = iter(plan.names)
        sizes = iter(plan.sizes) if plan.sizes is not None else None
        exhausted = False
        while not exhausted:
            size = next(sizes, None) if sizes is not None else shard_size
            if size is None:
                break
            name = next(names)
            keys: list[str] = []
            arrays: dict[str, list] = {}
            pending: list = []
            consumed = 0
            while consumed < size:
                s = next(plan.samples, _END)
                if s is _END:
                    exhausted = True
                    break
                consumed += 1
                if s is None:
                    skipped_records += 1
                    continue
                pending.append(s)
                if len(pending) == batch_size:
                    run_batch(pending, keys, arrays)
                    pending = []
            if pending:
                run_batch(pending, keys, arrays)
            if consumed == 0 and exhausted:
                break
            finish_shard(name, keys, arrays)
    finally:
        bar.close()
        teacher.train(was_training)

    seconds = time.time() - t0
    if accelerator is not None and world > 1:
        accelerator.wait_for_everyone()
        t = torch.tensor([teacher_calls, written, plan.skipped, skipped_records], device=device)
        teacher_calls, written, skipped, skipped_records = (int(x) for x in accelerator.reduce(t, "sum").tolist())
    else:
        skipped = plan.skipped
    if rank == 0 and os.path.exists(os.path.join(output_dir, CACHE_INFO)):
        _write_manifest(output_dir)
    cache = TeacherCache(output_dir)
    num_samples = len(cache) if os.path.exists(os.path.join(output_dir, CACHE_INFO)) else 0
    if not fields and num_samples:
        fields = dict(cache.fields)
    per_sample = sum(w * np.dtype(np_dtype).itemsize for w in fields.values()) if fields else 0.0
    if rows_written and bytes_written:
        per_sample = max(per_sample, bytes_written / rows_written)
    report = CacheReport(output_dir=output_dir, num_samples=num_samples, teacher_calls=teacher_calls,
                         bytes_per_sample=float(per_sample), skipped_shards=skipped, written_shards=written,
                         fields=dict(fields), dtype=dtype, seconds=seconds, skipped_records=skipped_records)
    if rank == 0:
        logger.info(report.summary())
        if progress:
            print(report.summary(), flush=True)
    return report


def _write_manifest(output_dir: str) -> None:
    """Collects every shard's checksum entry under ``shards`` in cache_info.json (rank 0, after all ranks wrote)."""
    info = _read_info(output_dir) or {}
    shards = {}
    for entry in sorted(glob.glob(os.path.join(output_dir, SHARD_DIR, "shard-*.sha256"))):
        with open(entry) as f:
            shards[os.path.basename(entry)[: -len(".sha256")] + ".arrow"] = json.load(f)
    info["shards"] = shards
    _atomic_write_bytes(os.path.join(output_dir, CACHE_INFO), json.dumps(info, indent=2).encode())


class TeacherCache:
    """Memory-mapped reader of a teacher-output cache directory (picklable: workers reopen the files).

    Every shard is checked against its checksum entry when the cache is first read (once: DataLoader workers get the
    verified state); ``verify=False`` skips that (e.g. a cache written before checksums existed)."""

    def __init__(self, path: str, verify: bool = True):
        self.path = str(path)
        self.verify = verify
        if not os.path.isdir(os.path.join(self.path, SHARD_DIR)):
            raise DistillationInputError(
                f"{self.path} is not a teacher cache (no {SHARD_DIR}/ directory). Create it with `hf-cifd cache-teacher` "
                "or hf_cifd.data.cache_teacher_outputs(teacher, dataset, output_dir)."
            )
        self._loaded = False

    def __getstate__(self):
        # Workers reopen the files but do not hash them again once this process has verified them.
        return {"path": self.path, "verify": self.verify and not self._loaded}

    def __setstate__(self, state):
        self.path, self.verify = state["path"], state.get("verify", True)
        self._loaded = False

    # -- loading -------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._loaded:
            return
        import pyarrow as pa
        import pyarrow.ipc as ipc

        files = sorted(glob.glob(os.path.join(self.path, SHARD_DIR, "shard-*.arrow")))
        self._info = _read_info(self.path) or {}
        self._views: list[dict[str, np.ndarray]] = []
        key_chunks = []
        counts = []
        fields: dict[str, int] = dict(self._info.get("fields", {}))
        for fpath in files:
            if self.verify:
                problem = _shard_problem(fpath)
                if problem:
                    raise DistillationInputError(
                        f"teacher cache shard {fpath} {problem}. Re-run `hf-cifd cache-teacher` "
                        "(cache_teacher_outputs) into the same directory: it writes that shard again.")
            try:
                table = ipc.open_file(pa.memory_map(fpath, "r")).read_all()
            except (pa.ArrowInvalid, OSError) as e:
                raise DistillationInputError(f"teacher cache shard {fpath} is unreadable ({e}). Re-run `hf-cifd "
                                             "cache-teacher` into the same directory: it writes that shard again.") from e
            views = {}
            for name in table.column_names:
                if name == "sample_key":
                    continue
                col = table.column(name).combine_chunks()
                width = col.type.list_size
                fields.setdefault(name, width)
                flat = col.flatten().to_numpy(zero_copy_only=False)
                views[name] = flat.reshape(-1, width)
            self._views.append(views)
            key_chunks.append(_fixed_width_keys(table.column("sample_key").combine_chunks()))
            counts.append(table.num_rows)
        self._fields = fields
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        width = max((k.dtype.itemsize for k in key_chunks), default=1)
        keys = np.concatenate([k.astype(f"S{width}") for k in key_chunks]) if key_chunks else np.zeros(0, f"S{width}")
        self._order = np.argsort(keys, kind="stable")
        self._sorted = keys[self._order]
        if len(self._sorted) > 1:
            dup = self._sorted[1:] == self._sorted[:-1]
            if dup.any():
                first = [k.decode() for k in self._sorted[1:][dup][:5]]
                raise DistillationInputError(
                    f"the teacher cache {self.path} holds duplicate sample keys ({first}); shards from different runs "
                    "were mixed (e.g. a streamed cache resumed with another process count). Rebuild it in a new directory."
                )
        self._keys = keys
        self._loaded = True

    # -- API -----------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        self._load()
        return int(self._offsets[-1])

    @property
    def keys(self) -> list[str]:
        self._load()
        return [k.decode() for k in self._keys]

    @property
    def fields(self) -> dict[str, int]:
        self._load()
        return dict(self._fields)

    def check_teacher(self, teacher) -> None:
        """Refuses a cache written by another teacher: the SHA-256 of the weights (which also covers the tensor names,
        i.e. the architecture) must be ``teacher``'s."""
        self._load()
        saved = self._info.get("fingerprint")
        if saved is None:
            raise DistillationInputError(
                f"the teacher cache {self.path} records no teacher fingerprint (written by an older hf_cifd), so it "
                "cannot be matched to the given teacher: rebuild it, or pass the cache without teacher=.")
        mine = teacher_fingerprint(teacher)
        if saved.get("weights_sha256") != mine["weights_sha256"]:
            raise DistillationInputError(
                f"the teacher cache {self.path} was written by another teacher: {saved.get('architecture')} with weights "
                f"sha256 {str(saved.get('weights_sha256'))[:12]}..., the given teacher is {mine['architecture']} with "
                f"{mine['weights_sha256'][:12]}.... Its outputs are not this teacher's: rebuild the cache with this "
                "teacher, or drop teacher= to train on the cached outputs.")

    @property
    def info(self) -> dict[str, Any]:
        self._load()
        return {"teacher": self._info.get("teacher"), "fingerprint": self._info.get("fingerprint"), "dtype": self._info.get("dtype"), "num_samples": len(self),
                "shard_size": self._info.get("shard_size"), "fields": self.fields, "path": self.path}

    def _lookup(self, keys: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        self._load()
        width = self._sorted.dtype.itemsize
        enc = [str(k).encode() for k in keys]
        q = np.array(enc, dtype=f"S{width}") if enc else np.zeros(0, f"S{width}")
        pos = np.searchsorted(self._sorted, q)
        pos_c = np.minimum(pos, max(len(self._sorted) - 1, 0))
        found = (np.array([len(e) <= width for e in enc], dtype=bool) & (len(self._sorted) > 0))
        if len(self._sorted):
            found &= self._sorted[pos_c] == q
        missing = [str(keys[i]) for i in np.flatnonzero(~found)]
        rows = self._order[pos_c] if len(self._sorted) else np.zeros(len(keys), np.int64)
        return rows, missing

    def __contains__(self, key: str) -> bool:
        return not self._lookup([key])[1]

    def _missing_error(self, missing: list[str], total: int) -> DistillationInputError:
        return DistillationInputError(
            f"the teacher cache {self.path} has no entry for {len(missing)} of {total} sample key(s) "
            f"(first: {missing[:5]}). The cache was built from another dataset, subset or max_samples, or its run did "
            "not finish. Re-run `hf-cifd cache-teacher` (hf_cifd.data.cache_teacher_outputs) on the same dataset and "
            "columns used for training, into the same directory: it resumes and computes only the missing shards."
        )

    def check_covers(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        _, missing = self._lookup(keys)
        if missing:
            raise self._missing_error(missing, len(keys))

    def get(self, keys: Sequence[str], fields: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """float32 tensors ``(len(keys), width)`` per field, rows in the order of ``keys``."""
        keys = list(keys)
        rows, missing = self._lookup(keys)
        if missing:
            raise self._missing_error(missing, len(keys))
        shard = np.searchsorted(self._offsets, rows, side="right") - 1
        local = rows - self._offsets[shard]
        out = {}
        for name in fields or self._fields:
            width = self._fields[name]
            res = np.empty((len(keys), width), dtype=np.float32)
            for s in np.unique(shard):
                sel = shard == s
                res[sel] = self._views[s][name][local[sel]]
            out[name] = torch.from_numpy(res)
        return out


def _fixed_width_keys(arr) -> np.ndarray:
    """Arrow string array -> numpy fixed-width bytes array, without a Python loop."""
    import pyarrow as pa

    arr = arr.cast(pa.large_binary())
    n = len(arr)
    if n == 0:
        return np.zeros(0, "S1")
    if arr.null_count:
        raise DistillationInputError("the teacher cache has null sample keys; rebuild it.")
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset: arr.offset + n + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(1, np.uint8)
    lengths = np.diff(offsets)
    width = max(int(lengths.max()), 1)
    idx = offsets[:-1, None] + np.arange(width)[None, :]
    mask = np.arange(width)[None, :] < lengths[:, None]
    mat = np.where(mask, data[np.minimum(idx, max(len(data) - 1, 0))], 0).astype(np.uint8)
    return np.ascontiguousarray(mat).view(f"S{width}").reshape(n)


class CachedTeacherCollator:
    """Wraps a collate fn: adds the cached teacher fields of each batch's ``sample_key`` (float32 tensors)."""

    def __init__(self, cache: TeacherCache | str, collate_fn: Callable | None = None, fields: Sequence[str] | None = None):
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
        self.collate_fn = collate_fn or default_collate
        self.fields = list(fields) if fields is not None else None

    def __call__(self, samples):
        batch = self.collate_fn(samples)
        if "sample_key" not in batch:
            raise DistillationInputError(
                "CachedTeacherCollator needs `sample_key` in every batch to join the teacher cache; the dataset or the "
                "wrapped collate_fn does not provide it."
            )
        batch.update(self.cache.get(batch["sample_key"], self.fields))
        return batch
