"""The HDF5 run file: schema, one transaction per write, resume state.

Every write is a transaction on a copy: the current file is read into memory, changed there,
written to ``run.h5.tmp``, fsync'ed and renamed over ``run.h5``. A kill at any moment leaves either
the old or the new file, never a half-written one, and the file is never held open between writes. The schema is
documented in ``cluster_docs/run_file.md``; ``SCHEMA_VERSION`` changes with it.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import time
from typing import Any, Iterator

import h5py
import numpy as np

SCHEMA_VERSION = 1
FORMAT = "hpcprune-run"
STAGES = ("baseline", "groups", "sensitivity", "allocation", "pruned", "finetune", "final")


class RunFileError(ValueError):
    """The run file cannot be used: not HDF5, another program's, a newer schema, or truncated."""


class RunDirLocked(RuntimeError):
    """Another sweep is running in this run directory."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RunFile:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    # ---- opening ------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise RunFileError unless this is a readable hpcprune run file of a known schema."""
        try:
            with h5py.File(self.path, "r") as f:
                fmt = f.attrs.get("format")
                version = f.attrs.get("schema_version")
        except OSError as e:
            raise RunFileError(f"{self.path}: not a readable HDF5 file ({e.__class__.__name__}: {e})") from e
        if fmt != FORMAT:
            raise RunFileError(f"{self.path}: not an hpcprune run file (format attribute is {fmt!r})")
        if version is None or int(version) > SCHEMA_VERSION:
            raise RunFileError(
                f"{self.path}: schema version {version} is newer than this hpcprune reads ({SCHEMA_VERSION}); "
                "upgrade hpcprune"
            )

    @contextlib.contextmanager
    def read(self) -> Iterator[h5py.File]:
        self.check()
        with h5py.File(self.path, "r") as f:
            yield f

    @contextlib.contextmanager
    def write(self) -> Iterator[h5py.File]:
        """One transaction: changes land all together or not at all.

        HDF5 works on an in-memory image of the file (h5py on a ``BytesIO``); only Python writes
        to disk: ``run.h5.tmp``, fsync, rename. A disk error (full disk, quota, I/O error) is then
        one clean ``OSError`` naming the file, with ``run.h5`` untouched: HDF5 itself failing to
        write (``No space left on device`` inside the library) was seen to end in a segfault.
        """
        tmp = self.path + ".tmp"
        image = io.BytesIO()
        if self.exists():
            with open(self.path, "rb") as fh:
                image.write(fh.read())
            image.seek(0)
        with h5py.File(image, "a") as f:
            yield f
            f.attrs["updated"] = _now()
        try:
            with open(tmp, "wb") as fh:
                fh.write(image.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            dir_fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise OSError(e.errno, f"cannot write the run file {self.path} ({e.strerror}); "
                          "its previous version is intact") from e
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    # ---- creation and status ------------------------------------------------------------------
    def create(self, config_yaml: str, meta: dict[str, Any]) -> None:
        with self.write() as f:
            f.attrs["format"] = FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["created"] = _now()
            f.attrs["config"] = config_yaml
            f.attrs["status"] = "running"
            f.attrs["status_reason"] = ""
            for k, v in meta.items():
                f.attrs[k] = v

    def set_status(self, status: str, reason: str = "", **attrs: Any) -> None:
        with self.write() as f:
            f.attrs["status"] = status
            f.attrs["status_reason"] = reason
            for k, v in attrs.items():
                f.attrs[k] = v

    def done_stages(self) -> list[str]:
        with self.read() as f:
            return [s for s in STAGES if s in f and bool(f[s].attrs.get("complete", False))]

    def attrs(self, stage: str | None = None) -> dict[str, Any]:
        with self.read() as f:
            node = f if stage is None else f[stage]
            return {k: _plain(v) for k, v in node.attrs.items()}


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def put_attrs(node: h5py.Group, attrs: dict[str, Any]) -> None:
    for k, v in attrs.items():
        if v is None:
            v = np.nan
        elif isinstance(v, (dict, list)) and not (isinstance(v, list) and v and isinstance(v[0], (int, float))):
            v = json.dumps(v)
        node.attrs[k] = v


def replace_group(f: h5py.File, name: str) -> h5py.Group:
    if name in f:
        del f[name]
    return f.create_group(name)


def write_state_dict(group: h5py.Group, state: dict[str, Any]) -> None:
    """Store a state dict as one dataset per tensor (no pickles): readable by any HDF5 tool.

    A tensor shared under several names (tied embedding and output head) is stored once; its other
    names are HDF5 hard links to the same dataset. Small and mid-size tensors are gzip-compressed;
    tensors above 1M elements are not (trained float weights barely compress, and gzip would cost
    seconds per write for an LLM)."""
    first: dict[tuple, str] = {}
    for k, v in state.items():
        key = (v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype) if v.numel() else None
        if key is not None and key in first:
            group[k] = group[first[key]]  # hard link
            continue
        if key is not None:
            first[key] = k
        arr = v.detach().cpu().numpy()
        group.create_dataset(k, data=arr, compression="gzip" if 4096 < arr.size <= (1 << 20) else None)


def read_state_dict(group: h5py.Group) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(np.array(d)) for k, d in group.items()}


class RunLock:
    """An exclusive lock on a run directory; the kernel drops it when the holder dies."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, "run.lock")
        self._fh: Any = None

    def acquire(self) -> "RunLock":
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunDirLocked(
                f"run directory {os.path.dirname(self.path)} is in use by {holder}; "
                "wait for it to end or choose another hydra.run.dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
