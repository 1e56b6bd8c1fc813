"""Real text corpora that exist offline, as plain strings: Jane Austen's novels, the King James
Bible, CPython's standard library sources.

None is downloaded at run time. Austen and KJV come from Debian packages that are fetched once with
the ordinary client and unpacked without installing them (``apt-get download PKG`` then
``dpkg-deb -x PKG_*.deb DIR``); the loaders look for the unpacked files under ``root`` or, when
``root`` is None, under ``$HPCPRUNE_CORPORA``, ``~/.cache/hpcprune/corpora`` and ``/`` (an installed
package). The error for a missing corpus says which commands bring it.

- ``austen``: Debian ``r-cran-janeaustenr``. The six novels are character vectors (one element per
  line of the printed book) in R's lazy-load database ``janeaustenr/data/Rdata.rdb`` + ``.rdx``;
  :func:`read_rdata` decodes it (R's XDR serialization, zlib-compressed records) without R.
- ``kjv``: Debian ``bible-kjv`` + ``bible-kjv-text``: its ``bible`` program decodes the compressed
  text (``bible -p DIR/usr/lib -f "gen1:1-rev22:21"``), one verse per line, references dropped.
- ``cpython``: this interpreter's standard library ``*.py`` files (:mod:`hpcprune.zoo.text`), in
  sorted order, each followed by an empty line.
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import subprocess
import zlib
from typing import Any

CORPORA = ("austen", "kjv", "cpython")
# the novels in publication order (the database lists them alphabetically)
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")

_AUSTEN_DB = os.path.join("usr", "lib", "R", "site-library", "janeaustenr", "data", "Rdata")
_KJV_BIN = os.path.join("usr", "bin", "bible")
_KJV_DATA = os.path.join("usr", "lib", "bible.data")
_VERSE_REF = re.compile(r"^\S*?\d+:\d+ ", re.MULTILINE)
_GET = {
    "austen": "apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb {dir}",
    "kjv": "apt-get download bible-kjv bible-kjv-text && dpkg-deb -x bible-kjv_*.deb {dir} && dpkg-deb -x bible-kjv-text_*.deb {dir}",
}


def search_roots(root: str | None) -> list[str]:
    """Folders searched for unpacked Debian packages: ``root`` alone when given, else
    ``$HPCPRUNE_CORPORA``, ``~/.cache/hpcprune/corpora`` and ``/``."""
    if root:
        return [os.path.expanduser(root)]
    env = os.environ.get("HPCPRUNE_CORPORA")
    return [*([env] if env else []), os.path.expanduser("~/.cache/hpcprune/corpora"), "/"]


def _missing(name: str, root: str | None, what: str) -> FileNotFoundError:
    dest = os.path.expanduser(root) if root else os.path.expanduser("~/.cache/hpcprune/corpora")
    return FileNotFoundError(
        f"corpus {name!r}: {what} not found under {search_roots(root)}; get it once with: "
        f"{_GET[name].format(dir=dest)}" + ("" if root else " (or set data.root / $HPCPRUNE_CORPORA to the unpacked folder)")
    )


# ---- R's serialization format (XDR), enough for data objects ----------------------------------------
class _RReader:
    """Decodes one object written by R's ``serialize`` in XDR (big-endian) format, versions 2 and 3.

    Vectors come back as Python lists (character vectors as ``str``, NA as None), pairlists and
    attributes as ``dict``; an object with attributes is ``{"value": ..., "attributes": {...}}``.
    Closures, environments and byte code are read past but not interpreted.
    """

    def __init__(self, data: bytes) -> None:
        self.b = data
        self.i = 0
        self.refs: list[Any] = []

    def int(self) -> int:
        v = struct.unpack_from(">i", self.b, self.i)[0]
        self.i += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def take(self, n: int) -> bytes:
        out = self.b[self.i : self.i + n]
        if len(out) != n:
            raise ValueError("R serialization: the data ends early")
        self.i += n
        return out

    def read(self) -> Any:
        if self.take(2) != b"X\n":
            raise ValueError("R serialization: only the XDR format is supported")
        version = self.int()
        self.int(), self.int()  # writer's R version, oldest reader
        if version == 3:
            self.take(self.int())  # native encoding name
        elif version != 2:
            raise ValueError(f"R serialization version {version} is not supported")
        return self.item()

    def item(self) -> Any:
        flags = self.int()
        t, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t in (254, 242, 241, 247, 251, 252, 253):  # NULL, empty/base/global env, base ns, missing, unbound
            return None
        if t == 255:  # reference to an earlier symbol or environment
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if t in (248, 249, 250):  # persistent name, namespace, package env: a string vector follows
            self.int()  # 0
            names = [self.item() for _ in range(self.length())]
            self.refs.append(names)
            return names
        if t == 1:  # symbol: its name as a CHARSXP
            name = self.item()
            self.refs.append(name)
            return name
        if t == 4:  # environment
            env: dict[str, Any] = {}
            self.refs.append(env)
            self.int()  # locked
            self.item(), self.item(), self.item()  # enclosure, frame, hash table
            self.item()  # attributes
            return env
        if t in (2, 3, 5, 6, 17, 239, 240):  # pairlist-like: (attr) (tag) car cdr
            attrs = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            out = {tag if tag is not None else len(cdr or {}): car}
            if isinstance(cdr, dict):
                out.update(cdr)
            return {"value": out, "attributes": attrs} if attrs else out
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            raw = self.take(n)
            latin1 = bool((flags >> 12) & 4)
            return raw.decode("latin-1" if latin1 else "utf-8", errors="replace")
        if t == 238:  # ALTREP: class info, state, attributes
            return self._altrep()
        value = self._vector(t)
        if has_attr:
            return {"value": value, "attributes": self.item()}
        return value

    def _vector(self, t: int) -> Any:
        """The elements of a vector of type ``t`` (logical, integer, double, complex, character, list,
        expression, raw)."""
        if t in (10, 13):  # logical, integer
            n = self.length()
            vals = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
            return [None if v == -(2**31) else v for v in vals]
        if t == 14:  # double
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
            return value
        if t == 15:  # complex
            n = self.length()
            v = struct.unpack_from(f">{2 * n}d", self.b, self.i)
            self.i += 16 * n
            return [complex(v[2 * k], v[2 * k + 1]) for k in range(n)]
        if t in (16, 19, 20):  # character vector, list, expression
            return [self.item() for _ in range(self.length())]
        if t == 24:  # raw
            return self.take(self.length())
        raise ValueError(f"R serialization: object type {t} is not supported")

    def _altrep(self) -> Any:
        """An ALTREP object (class info, state, attributes): compact sequences expanded, wrappers unwrapped."""
        info, state, attrs = self.item(), self.item(), self.item()
        cls = next(iter(info.values())) if isinstance(info, dict) else info
        if cls == "compact_intseq" and isinstance(state, list) and len(state) == 3:
            n, start, step = (int(x) for x in state)
            value: Any = list(range(start, start + n * step, step))
        elif cls == "compact_realseq" and isinstance(state, list) and len(state) == 3:
            n, start, step = state
            value = [start + k * step for k in range(int(n))]
        elif isinstance(state, dict) and state:  # wrapper classes: (payload, metadata)
            value = next(iter(state.values()))
        else:
            value = state
        return {"value": value, "attributes": attrs} if attrs else value


def _unserialize(raw: bytes) -> Any:
    return _RReader(raw).read()


def _plain(obj: Any) -> Any:
    """An R value without its attributes."""
    return obj["value"] if isinstance(obj, dict) and set(obj) == {"value", "attributes"} else obj


def _named(obj: Any) -> dict[str, Any]:
    """A named R list as a dict."""
    if isinstance(obj, dict) and set(obj) == {"value", "attributes"}:
        return dict(zip(obj["attributes"]["names"], obj["value"]))
    raise ValueError("R serialization: expected a named list")


def read_rdata(base: str) -> dict[str, Any]:
    """Every object of an R lazy-load database (``base + ".rdx"`` index, ``base + ".rdb"`` records)."""
    with open(base + ".rdx", "rb") as f:
        index = _named(_unserialize(gzip.decompress(f.read())))
    variables = _named(index["variables"])
    compressed = int(_plain(index.get("compressed", [1]))[0])
    if compressed not in (1, True):
        raise ValueError(f"{base}.rdb: compression type {compressed} is not supported (only zlib)")
    out = {}
    with open(base + ".rdb", "rb") as f:
        db = f.read()
    for name, pos in variables.items():
        offset, size = int(pos[0]), int(pos[1])
        rec = db[offset : offset + size]
        # a record is a 4-byte big-endian uncompressed length, then zlib data (R's type 1 compression)
        out[name] = _unserialize(zlib.decompress(rec[4:]))
    return out


def austen_text(root: str | None = None, books: tuple[str, ...] = AUSTEN_BOOKS) -> str:
    """The six novels as one text (publication order), lines joined by newlines, books separated by
    a blank line."""
    for r in search_roots(root):
        for base in (os.path.join(r, _AUSTEN_DB), os.path.join(r, "janeaustenr", "data", "Rdata"), os.path.join(r, "data", "Rdata")):
            if os.path.isfile(base + ".rdb") and os.path.isfile(base + ".rdx"):
                objs = read_rdata(base)
                unknown = [b for b in books if b not in objs]
                if unknown:
                    raise ValueError(f"corpus 'austen': no book {unknown[0]!r} (known: {sorted(objs)})")
                return "\n\n".join("\n".join(x or "" for x in _plain(objs[b])) for b in books)
    raise _missing("austen", root, "janeaustenr/data/Rdata.rdb")




def kjv_text(root: str | None = None) -> str:
    """The King James Bible, one verse per line (without its reference), from Debian's ``bible``
    program and data."""
    for r in search_roots(root):
        exe, data = os.path.join(r, _KJV_BIN), os.path.join(r, _KJV_DATA)
        if r == "/" and not os.path.isfile(exe):
            exe = shutil.which("bible") or exe
        if os.path.isfile(exe) and os.path.isfile(data):
            res = subprocess.run([exe, "-p", os.path.dirname(data), "-f", "gen1:1-rev22:21"], capture_output=True, check=False)
            if res.returncode != 0 or not res.stdout:
                raise RuntimeError(f"corpus 'kjv': {exe} failed ({res.returncode}): {res.stderr.decode(errors='replace')[-300:]}")
            # each line is "Ge1:1 In the beginning ...": drop the reference, keep the verse
            return _VERSE_REF.sub("", res.stdout.decode("utf-8", errors="replace"))
    raise _missing("kjv", root, "usr/bin/bible and usr/lib/bible.data")


def cpython_text(root: str | None = None, max_file_bytes: int = 32_768) -> str:
    """The standard library's ``*.py`` files (sorted paths), each cut at ``max_file_bytes``."""
    from .text import stdlib_files

    root = root or os.path.dirname(os.__file__)
    parts = []
    for name in stdlib_files(root):
        with open(os.path.join(root, name), "rb") as f:
            parts.append(f.read(max_file_bytes).decode("utf-8", errors="replace"))
    return "\n\n".join(parts)


def corpus_text(name: str, root: str | None = None) -> str:
    """One of :data:`CORPORA` as a string."""
    if name == "austen":
        return austen_text(root)
    if name == "kjv":
        return kjv_text(root)
    if name == "cpython":
        return cpython_text(root)
    raise ValueError(f"data.corpus={name!r}: choose one of {', '.join(CORPORA)}")
