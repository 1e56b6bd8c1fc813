"""The HDF5 run file: schema, one transaction per write, resume state.

Every write is a transaction on a copy: the current file is read into memory, changed there,
written to ``run.h5.tmp``, fsync'ed and renamed over ``run.h5``. A kill at any moment leaves either
the old or the new file, never a half-written one, and the file is never held open between writes. The schema is
documented in ``cluster_docs/run_file.md``; ``SCHEMA_VERSION`` changes with it.

Weights (schema 2) live beside the run file, one safetensors file per stage (``dense.safetensors``,
``pruned.safetensors``, ``final.safetensors``), each written once (temporary file, fsync, rename)
before the transaction that records it; the stage group holds only its name, size and digest, so a
transaction copies kilobytes, not the model. A user's dense checkpoint is referenced, not copied.
Schema 1 files (weights as HDF5 datasets in ``<stage>/weights``) are still read, reported and
resumed: :func:`read_weights` and :func:`write_weights` handle both layouts.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import time
from collections import OrderedDict
from typing import Any, Iterator

import h5py
import numpy as np

from .errors import HpcpruneError

SCHEMA_VERSION = 2  # 1: weights inside the run file (still read); 2: weights in safetensors files beside it
FORMAT = "hpcprune-run"
# every group a stage completes, in README's order (``done_stages`` lists them so). The one list of
# stage names: TIMED_STAGES, the pipeline's table (hpcprune.stages.STAGES, in the order the stages
# run, checked against it), the report's columns and the plots take theirs from here.
STAGES = ("baseline", "groups", "sensitivity", "allocation", "pruned", "finetune", "final")
# the pipeline's stages, one per row of README's stage table: each is timed under its name and done
# once that group is complete. /finetune is not one: the fine-tune stage (``final``) writes it with /final
TIMED_STAGES = tuple(s for s in STAGES if s != "finetune")
# the stages that hold weights, and their files in the run directory (schema 2)
WEIGHT_FILES = {"baseline": "dense.safetensors", "pruned": "pruned.safetensors", "final": "final.safetensors"}


log = logging.getLogger("hpcprune.store")
_WRITES = [0]  # run-file transactions of this process (for the fault tests' failpoint)


def _failpoint(tmp: str) -> None:
    """Fault tests (tests/faults): with ``HPCPRUNE_FAILPOINT_WRITE=k`` in the environment, the k-th
    run-file transaction of this process stops between writing ``run.h5.tmp`` and renaming it, and
    says so in ``run.h5.tmp.stopped``, until the test kills it: a kill at exactly that point, without
    racing a short-lived file. Not set: nothing happens."""
    _WRITES[0] += 1
    want = os.environ.get("HPCPRUNE_FAILPOINT_WRITE", "")
    if want.isdigit() and _WRITES[0] == int(want):
        with open(tmp + ".stopped", "w") as fh:
            fh.write(f"pid {os.getpid()} write {_WRITES[0]}\n")
        while True:
            time.sleep(1.0)


class RunFileError(HpcpruneError, ValueError):
    """The run file cannot be used: not HDF5, another program's, a newer schema, or truncated."""


class RunDirLocked(HpcpruneError, RuntimeError):
    """Another sweep is running in this run directory."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RunFile:
    def __init__(self, path: str) -> None:
        """The run file at ``path``; a run directory stands for the ``run.h5`` in it."""
        path = os.fspath(path)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "run.h5")):
            path = os.path.join(path, "run.h5")
        self.path = os.path.abspath(path)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    # ---- opening ------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise RunFileError unless this is a readable hpcprune run file of a known schema (1 or 2)."""
        if not os.path.exists(self.path):
            raise RunFileError(f"{self.path}: no such file")
        if os.path.isdir(self.path):
            raise RunFileError(f"{self.path}: a directory without a run.h5 (give a run file, or the run directory holding it)")
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
            # a schema 1 file written by this version may get schema 2 parts (weights beside it)
            if "format" in f.attrs and int(f.attrs.get("schema_version", SCHEMA_VERSION)) < SCHEMA_VERSION:
                f.attrs["schema_version"] = SCHEMA_VERSION
        try:
            with open(tmp, "wb") as fh:
                fh.write(image.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
            _failpoint(tmp)
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
    """Schema 1 layout (no longer written by the sweep: see :func:`write_weights`): a state dict as
    one dataset per tensor (no pickles), readable by any HDF5 tool.

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
    """A schema 1 state dict (``<stage>/weights``, one dataset per tensor)."""
    import torch

    return OrderedDict((k, torch.from_numpy(np.array(d))) for k, d in group.items())


# ---- weights (schema 2: safetensors files beside the run file) -----------------------------------
class WeightsError(RunFileError):
    """A weights file the run file records is missing or changed since it was recorded."""


_META_KEY = "hpcprune"  # safetensors metadata entry: JSON {"keys", "aliases", "metadata"}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_checkpoint(path: str) -> dict[str, Any]:
    """The state dict in a user's checkpoint file (``checkpoint=``): a torch state-dict file, or a
    dict holding one under ``state_dict``. ValueError (one line, without the path) when it is not.

    The baseline loads the dense model through this function, and a run file that references the
    checkpoint reads it back through it: the model rebuilt from the run is the baseline's."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"not a readable torch state dict ({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    return state


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_safetensors(path: str, state: dict[str, Any]) -> tuple[int, str]:
    """Write ``state`` to ``path`` through ``path.tmp``, fsync, rename; returns (bytes, sha256).

    A tensor shared under several names (a tied embedding and output head) is stored once, the
    other names recorded as aliases; the state dict's ``_metadata`` (module versions, read by some
    modules' ``_load_from_state_dict``) and its key order are kept in the file's metadata."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    storages: set[int] = set()
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor: cannot store it")
        key = (v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype, v.device) if v.numel() else None
        if key is not None and key in first:
            aliases[k] = first[key]
            continue
        if key is not None:
            first[key] = k
        t = v.detach().cpu()
        # safetensors refuses two names on one storage: other views of a stored storage are copies
        sid = t.untyped_storage().data_ptr() if t.numel() else None
        if sid is not None and sid in storages:
            t = t.clone()
        elif sid is not None:
            storages.add(sid)
        tensors[k] = t.contiguous()
    meta = getattr(state, "_metadata", None)
    info = {"keys": list(state), "aliases": aliases, "metadata": dict(meta) if meta is not None else None}
    tmp = path + ".tmp"
    try:
        try:
            # sorted mappings (the keys list keeps its order): equal tensors give equal bytes and sha256,
            # however the state dict's _metadata was ordered (a resumed run's model is built otherwise)
            save_file(tensors, tmp, metadata={"format": "pt", _META_KEY: json.dumps(info, default=str, sort_keys=True)})
        except Exception as e:  # safetensors' own SafetensorError: "I/O error: No space left on device (os error 28)"
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from e
        _canonical_metadata(tmp)
        h = hashlib.sha256()
        with open(tmp, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
            os.fsync(fh.fileno())
        size = os.path.getsize(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (safetensors writes 0600)
        os.replace(tmp, path)
        _fsync_dir(path)
    except OSError as e:
        raise OSError(e.errno, f"cannot write the weights file {path} ({e.strerror}); the run file is intact") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return size, h.hexdigest()


def _canonical_metadata(path: str) -> None:
    """The safetensors header's ``__metadata__`` entries in sorted order, in place. safetensors
    writes that mapping from a Rust ``HashMap``, whose order changes from one save to the next: two
    saves of the same tensors and metadata gave other bytes (and another sha256) about half the
    time. The header keeps its length (padded with spaces, as safetensors pads it); left as written
    where the rewrite would not fit, or the header is not what safetensors writes."""
    with open(path, "r+b") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return
        n = int.from_bytes(head, "little")
        raw = fh.read(n)
        try:
            header = json.loads(raw)
        except ValueError:
            return
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or len(meta) < 2:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > n or json.loads(new) != json.loads(raw):
            return
        fh.seek(8)
        fh.write(new + b" " * (n - len(new)))


def load_safetensors(path: str) -> "OrderedDict[str, Any]":
    """A state dict written by :func:`save_safetensors`: its key order, tied names as one tensor,
    ``_metadata`` set when it had one. Plain safetensors files load too."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    info = json.loads(meta.get(_META_KEY, "{}"))
    aliases = info.get("aliases") or {}
    state: OrderedDict[str, Any] = OrderedDict()
    for k in info.get("keys") or list(tensors):
        state[k] = tensors[aliases[k]] if k in aliases else tensors[k]
    if info.get("metadata") is not None:
        state._metadata = OrderedDict(info["metadata"])  # type: ignore[attr-defined]
    return state


def _file_record(path: str, sha256: str | None = None) -> dict[str, Any]:
    st = os.stat(path)
    return {"weights_bytes": int(st.st_size), "weights_mtime_ns": int(st.st_mtime_ns),
            "weights_sha256": sha256 or _sha256(path)}


def write_weights(run_file: RunFile, stage: str, state_dict: dict[str, Any], group: h5py.Group | None = None,
                  reference: str | None = None, same_as: dict[str, Any] | None = None) -> dict[str, Any]:
    """Store the weights of ``stage`` (``baseline``, ``pruned``, ``final``) beside the run file and
    record them in the stage group as attributes: ``weights_file`` (relative to the run directory;
    an absolute path for a referenced checkpoint), ``weights_bytes``, ``weights_sha256``,
    ``weights_mtime_ns``, ``weights_reference`` (True: the user's file, not copied).

    ``reference``: a checkpoint file to record instead of writing ``state_dict`` (the dense weights
    loaded from it with :func:`load_checkpoint`). ``same_as``: the recorded attributes of another
    stage whose weights file holds exactly ``state_dict`` (the final weights of a run that is not
    fine-tuned are the pruned ones): that file is hard-linked under this stage's name, neither
    written nor hashed again (an 8B model: 16 GB not written twice), where the file system allows
    it; else ``state_dict`` is written. ``group``: the stage's group inside an open
    transaction of ``run_file`` (the weights file lands before that transaction does); without it
    this function makes its own transaction on ``/<stage>``. Returns the recorded attributes."""
    if stage not in WEIGHT_FILES:
        raise ValueError(f"stage {stage!r} holds no weights (one of {', '.join(WEIGHT_FILES)})")
    linked = _linked(run_file, stage, same_as) if same_as is not None and reference is None else None
    if linked is not None:
        rec = linked
    elif reference is not None:
        path = os.path.abspath(str(reference))
        rec = {"weights_file": path, **_file_record(path), "weights_reference": True}
    else:
        name = WEIGHT_FILES[stage]
        size, digest = save_safetensors(os.path.join(os.path.dirname(run_file.path), name), state_dict)
        rec = {"weights_file": name, **_file_record(os.path.join(os.path.dirname(run_file.path), name), digest),
               "weights_reference": False}

    def put(g: h5py.Group) -> None:
        if "weights" in g:  # schema 1 datasets of an earlier write
            del g["weights"]
        for k, v in rec.items():
            g.attrs[k] = v

    if group is not None:
        put(group)
    else:
        with run_file.write() as f:
            put(f.require_group(stage))
    return rec


def _linked(run_file: RunFile, stage: str, src: dict[str, Any]) -> dict[str, Any] | None:
    """``stage``'s weights file as a hard link of the file recorded in ``src`` (checked against its
    record first); its record, or None where there is no such file or no hard link can be made
    (the caller writes the weights then)."""
    if src.get("weights_reference") or "weights_file" not in src:
        return None
    verify_weights(run_file, next((k for k, v in WEIGHT_FILES.items() if v == src["weights_file"]), "source"), src)
    name = WEIGHT_FILES[stage]
    path = os.path.join(os.path.dirname(run_file.path), name)
    tmp = path + ".tmp"
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.link(weights_path(run_file, src), tmp)
        os.replace(tmp, path)
    except OSError as e:  # a file system without hard links
        log.info("weights: %s written anew (no hard link to %s: %s)", name, src["weights_file"], e)
        return None
    return {"weights_file": name, "weights_bytes": int(src["weights_bytes"]), "weights_mtime_ns": int(os.stat(path).st_mtime_ns),
            "weights_sha256": str(src["weights_sha256"]), "weights_reference": False}


def has_weights(f: h5py.File, stage: str) -> bool:
    """Whether ``/<stage>`` of an open run file records weights (either schema)."""
    return stage in f and ("weights_file" in f[stage].attrs or "weights" in f[stage])


def weights_path(run_file: RunFile, rec: dict[str, Any]) -> str:
    p = str(rec["weights_file"])
    return p if os.path.isabs(p) else os.path.join(os.path.dirname(run_file.path), p)


def verify_weights(run_file: RunFile, stage: str, rec: dict[str, Any] | None = None) -> None:
    """WeightsError (one line) unless the weights file of ``stage`` is the one recorded: same size,
    and the same mtime or else the same sha256. Schema 1 stages (weights inside) always pass."""
    if rec is None:
        with run_file.read() as f:
            if stage not in f or "weights_file" not in f[stage].attrs:
                return
            rec = {k: _plain(v) for k, v in f[stage].attrs.items()}
    path = weights_path(run_file, rec)
    what = "the dense checkpoint" if rec.get("weights_reference") else f"the {stage} weights file"
    fix = ("restore it, or start a new run (another hydra.run.dir)" if rec.get("weights_reference")
           else "the run directory is damaged; restore the file or start a new run")
    try:
        st = os.stat(path)
    except OSError as e:
        raise WeightsError(f"{run_file.path}: {what} {path} is gone ({e.strerror}); {fix}") from None
    if st.st_size != int(rec["weights_bytes"]):
        raise WeightsError(f"{run_file.path}: {what} {path} changed since it was recorded "
                           f"({st.st_size} bytes, recorded {int(rec['weights_bytes'])}); {fix}")
    if st.st_mtime_ns != int(rec.get("weights_mtime_ns", -1)) and _sha256(path) != str(rec["weights_sha256"]):
        raise WeightsError(f"{run_file.path}: {what} {path} changed since it was recorded (sha256 differs); {fix}")


def read_weights(run_file: RunFile, stage: str) -> "OrderedDict[str, Any]":
    """The state dict of ``stage`` (``baseline``, ``pruned``, ``final``), from either schema:
    schema 2 reads (and first verifies) the file beside the run file or the referenced checkpoint,
    schema 1 the datasets in ``/<stage>/weights``. KeyError when the stage holds no weights."""
    with run_file.read() as f:
        if stage not in f:
            raise KeyError(f"{run_file.path}: no /{stage} (the stage has not run)")
        g = f[stage]
        if "weights_file" not in g.attrs:
            if "weights" not in g:
                raise KeyError(f"{run_file.path}: /{stage} holds no weights")
            return read_state_dict(g["weights"])
        rec = {k: _plain(v) for k, v in g.attrs.items()}
    verify_weights(run_file, stage, rec)
    path = weights_path(run_file, rec)
    if rec.get("weights_reference"):
        try:
            return load_checkpoint(path)
        except ValueError as e:
            raise WeightsError(f"{run_file.path}: the dense checkpoint {path}: {e}") from None
    return load_safetensors(path)


def write_sensitivity_cells(run_file: RunFile, state: dict[str, np.ndarray], attrs: dict[str, Any],
                            ratios: list[float] | None = None, complete: bool = False, wall: float | None = None) -> None:
    """One flush of the sensitivity grid, in its own transaction (see :func:`put_sensitivity_cells`)."""
    with run_file.write() as f:
        put_sensitivity_cells(f, state, attrs, ratios, complete, wall)


def put_sensitivity_cells(f: h5py.File, state: dict[str, np.ndarray], attrs: dict[str, Any],
                          ratios: list[float] | None = None, complete: bool = False, wall: float | None = None) -> None:
    """One flush of the sensitivity grid into an open transaction ``f``: the (G, R) cell arrays and
    per-group arrays of ``state``, the stage attributes ``attrs``; ``ratios`` on the first flush;
    ``complete``: the last flush (``wall`` seconds added to ``wall_s``)."""
    s = f["sensitivity"] if "sensitivity" in f else f.create_group("sensitivity")
    if "ratios" not in s and ratios is not None:
        s.create_dataset("ratios", data=np.array([float(r) for r in ratios]))
    for k, v in state.items():
        if k in s:
            s[k][...] = v
        else:
            s.create_dataset(k, data=v)
    for k, v in attrs.items():
        s.attrs[k] = v
    if complete:
        s.attrs["wall_s"] = float(wall or 0.0) + float(s.attrs.get("wall_s", 0.0))
        s.attrs["complete"] = True


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
