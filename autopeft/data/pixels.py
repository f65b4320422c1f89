"""The pixel store: image files decoded and resized once per node, kept as uint8 arrays on disk.

A search runs many trials on the same images, each in a fresh dataset, often in another process; decoding and
resizing a JPEG costs a core milliseconds, while a GPU step consumes thousands of images a second. So the first
dataset that needs the images of a split decodes them all once, at the backbone's input size, into one file
`<store>/<key>.npy` (uint8, N × C × H × W, written under a temporary name and renamed when complete), under a lock
file so that concurrent trials of one node decode once; every later dataset of any process maps that file
read-only (the page cache is shared, nothing is loaded whole). The key covers the files (path, size, modification
time), the input size, interpolation and colour mode, so a changed file or another size makes a new entry.

Where: `$AUTOPEFT_PIXEL_CACHE` (default `~/.cache/autopeft/pixels`), one per node. How much: the store is bounded by
`$AUTOPEFT_PIXEL_CACHE_MB` (default 32768); least recently used entries go first, a split larger than the whole
bound is not stored (its images are decoded as they are read), 0 turns the store off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from autopeft.defaults import env_megabytes
from autopeft.errors import AutopeftError
from autopeft.filelock import locked

FORMAT = 1  # bump when what an entry holds for the same key changes


def store_dir() -> Path:
    env = os.environ.get("AUTOPEFT_PIXEL_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "autopeft" / "pixels"


def store_limit() -> int:
    """Bytes the store may hold on this node ($AUTOPEFT_PIXEL_CACHE_MB, default 32768; 0: no store)."""
    return env_megabytes("AUTOPEFT_PIXEL_CACHE_MB", 32768)


def entry_key(files: Sequence[str], shape: tuple[int, int, int], interpolation: str, mode: str) -> str | None:
    """The store key of `files` preprocessed to `shape` (C, H, W); None when a file cannot be stat-ed (the reader
    then says what is wrong with it)."""
    h = hashlib.sha256(json.dumps(dict(v=FORMAT, shape=list(shape), interpolation=interpolation, mode=mode)).encode())
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            return None
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _map(path: Path, count: int, shape: tuple[int, int, int]) -> np.ndarray | None:
    """The entry at `path`, memory-mapped copy-on-write (a process never writes the file); None when it is missing
    or not what the key says (such a file is deleted: decoded again, never trusted)."""
    try:
        array = np.load(path, mmap_mode="c")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return None
    if array.dtype != np.uint8 or array.shape != (count, *shape):
        path.unlink(missing_ok=True)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: evicted last
    return array


def _make_room(directory: Path, need: int, limit: int) -> None:
    """Delete least recently used entries until `need` more bytes fit under `limit` (a mapped file stays readable by
    the processes that map it: deleting it only frees its name)."""
    entries = []
    for p in directory.glob("*.npy"):
        with contextlib.suppress(OSError):
            st = p.stat()
            entries.append((st.st_mtime, st.st_size, p))
    used = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if used + need <= limit:
            break
        p.unlink(missing_ok=True)
        used -= size


def stored(
    files: Sequence[str],
    shape: tuple[int, int, int],
    interpolation: str,
    mode: str,
    decode: Callable[[str], np.ndarray],
    threads: int = 1,
) -> np.ndarray | None:
    """The uint8 N × C × H × W pixels of `files`, from the store, decoding them into it first when they are not
    there yet (once per node: other processes wait on the entry's lock, then map it).

    `decode(path)` gives one file's C × H × W uint8 pixels (and raises AutopeftError for an unreadable file, before
    anything is published). Returns None where the store is off, the split is larger than its bound, or the store
    directory cannot be written (the caller decodes as it reads; a warning says why for the last).
    """
    limit = store_limit()
    nbytes = len(files) * int(np.prod(shape))
    if limit <= 0 or not files or nbytes > limit:
        return None
    key = entry_key(files, shape, interpolation, mode)
    if key is None:
        return None
    directory = store_dir()
    path = directory / f"{key}.npy"
    found = _map(path, len(files), shape)
    if found is not None:
        return found
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with locked(directory / f"{key}.lock"):
            found = _map(path, len(files), shape)  # decoded by another process while this one waited
            if found is not None:
                return found
            _make_room(directory, nbytes, limit)
            partial = directory / f"{key}.{os.getpid()}.partial"
            try:
                out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(files), *shape))
                with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL decodes and resizes without the GIL
                    for i, pixels in enumerate(pool.map(decode, files)):
                        out[i] = pixels
                out.flush()
                del out
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
    except AutopeftError:
        raise
    except OSError as exc:
        warnings.warn(f"the pixel store {directory} cannot be used ({exc}); images are decoded as they are read",
                      stacklevel=2)
        return None
    return _map(path, len(files), shape)
