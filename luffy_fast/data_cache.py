"""The on-disk cache of tokenized data: built once per machine, read by every rank and restart.

The key hashes the data files (resolved path, size, modification and change times, inode), the
tokenizer (its vocabulary and rules, special tokens and chat template) and the limits, so
editing any of them builds a new entry; a damaged entry is built again, with a warning. A file
lock beside the entry makes the first process build it while the others (the other ranks of
the machine) wait and read it. An entry is one `.npz` file: the token ids flat in int32 arrays
with offsets, the strings and the report as JSON, written to a temporary name, synced and
renamed into place, so a crash never leaves a half entry. The cache keeps the KEEP_ENTRIES most
recently used entries (an entry of the official data is ~0.8 GiB, and every change of the limits
or the tokenizer makes a new one): whoever builds an entry removes the older ones, and the
temporary files of writers that died, each under its entry's lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from luffy_fast.data import DataLimits, DataReport, Sample, load_samples
from luffy_fast.data_files import data_files
from luffy_fast.run_files import ensure_writable_dir, say_at_start, warn

CACHE_VERSION = 2
KEEP_ENTRIES = 6


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the tokenizer's output."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([type(tokenizer).__name__, tokenizer.eos_token_id,
                              getattr(tokenizer, "chat_template", None),
                              sorted(map(str, tokenizer.all_special_tokens))]).encode())
    return digest.hexdigest()


def cache_key(source, tokenizer, limits: DataLimits, key: str = "data.source") -> str:
    files = []
    for file in data_files(source, key):
        stat = file.stat()
        # the inode and change time too: a same-size edit whose modification time was kept
        # (cp -p, rsync -a, tar) still changes them
        files.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino,
                      stat.st_ctime_ns])
    text = json.dumps({"version": CACHE_VERSION, "files": files, "limits": asdict(limits),
                       "tokenizer": tokenizer_fingerprint(tokenizer)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load_cached_samples(source, tokenizer, limits: DataLimits, cache_dir: Path | str,
                        key: str = "data.source") -> tuple[list[Sample], DataReport]:
    """`luffy_fast.data.load_samples`, through the cache entry for (files, tokenizer, limits)."""
    from filelock import FileLock

    cache_dir = ensure_writable_dir(cache_dir, key="data.cache_dir")
    name = cache_key(source, tokenizer, limits, key)
    entry = cache_dir / f"{name}.npz"
    with FileLock(str(cache_dir / f"{name}.lock")):
        if entry.is_file():
            try:
                found = read_entry(entry)
                with contextlib.suppress(OSError):  # another user's entry in a shared cache
                    os.utime(entry)  # its last use, which decides what prune_cache keeps
                return found
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
                warn(f"{entry}: a damaged cache entry ({type(error).__name__}: {error}); "
                     f"tokenizing {source} again")
        samples, report = load_samples(source, tokenizer, limits, key=key)
        write_entry(entry, samples, report)
    removed = prune_cache(cache_dir, KEEP_ENTRIES)
    if removed:
        size = sum(size for _, size in removed) / 2**20
        say_at_start(f"data cache {cache_dir}: removed {len(removed)} older entries and unfinished "
                     f"writes ({size:.0f} MiB), keeping the {KEEP_ENTRIES} last used")
    return samples, report


def prune_cache(cache_dir: Path, keep: int = KEEP_ENTRIES) -> list[tuple[Path, int]]:
    """Remove all but the `keep` most recently used entries of `cache_dir`, and the temporary
    files of writers that are gone; (path, bytes) of each removed. A file is removed only under
    its entry's lock, taken without waiting: an entry being read or written stays, and a
    temporary file whose lock is free has no writer left (on any machine sharing the folder,
    where its file system gives locks across machines, as the build lock needs too)."""
    from filelock import FileLock, Timeout

    def last_use(path: Path) -> int:
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:
            return -1

    entries = sorted(cache_dir.glob("*.npz"), key=last_use, reverse=True)
    removed = []
    for path in entries[keep:] + sorted(cache_dir.glob(".*.npz.tmp-*")):
        name = path.name.lstrip(".").split(".npz")[0]
        try:
            with FileLock(str(cache_dir / f"{name}.lock"), timeout=0):
                size = path.stat().st_size
                path.unlink()
        except (Timeout, FileNotFoundError):
            continue
        removed.append((path, size))
    return removed


def _flat(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in lists])
    tokens = np.fromiter((t for x in lists for t in x), dtype=np.int32, count=int(offsets[-1]))
    return tokens, offsets


def _split(tokens: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    return [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def write_entry(path: Path, samples: list[Sample], report: DataReport) -> None:
    prompt_tokens, prompt_offsets = _flat([s.prompt_ids for s in samples])
    trace_tokens, trace_offsets = _flat([t for s in samples for t in s.traces])
    meta = {"ground_truths": [s.ground_truth for s in samples],
            "data_sources": [s.data_source for s in samples],
            "wheres": [s.where for s in samples],
            "report": report.to_dict()}
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with temporary.open("wb") as out:
            np.savez(out, prompt_tokens=prompt_tokens, prompt_offsets=prompt_offsets,
                     trace_tokens=trace_tokens, trace_offsets=trace_offsets,
                     traces_per_sample=np.array([len(s.traces) for s in samples], dtype=np.int64),
                     meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
            out.flush()
            os.fsync(out.fileno())  # whole on disk before the rename publishes it
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # a failed write leaves no partial entry behind


def read_entry(path: Path) -> tuple[list[Sample], DataReport]:
    with np.load(path, allow_pickle=False) as entry:
        prompts = _split(entry["prompt_tokens"], entry["prompt_offsets"])
        traces = _split(entry["trace_tokens"], entry["trace_offsets"])
        counts = entry["traces_per_sample"].tolist()
        meta = json.loads(entry["meta"].tobytes().decode())
    samples, start = [], 0
    for i, prompt_ids in enumerate(prompts):
        samples.append(Sample(prompt_ids, meta["ground_truths"][i], traces[start:start + counts[i]],
                              meta["data_sources"][i], meta["wheres"][i]))
        start += counts[i]
    return samples, DataReport(**meta["report"])
