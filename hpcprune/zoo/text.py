"""Byte-level language modelling on CPython's standard library sources (real text, on every machine).

The corpus is the interpreter's own ``*.py`` files (``os.path.dirname(os.__file__)``), without test
folders and installed packages. Files are listed in sorted order and shuffled with the seed; the
first ones make the validation text (held-out files), the next ones the training text, each up to
its byte budget. Every file is cut at ``max_file_bytes`` (a few huge files would otherwise fill the
budget) and ends with a 0 byte (end of file). Samples are non-overlapping windows of ``context``
bytes; the target is the next byte at every position. The content follows the interpreter version,
so numbers compare only between runs on the same Python.
"""
from __future__ import annotations

import os
import random

import torch
from torch.utils.data import Dataset

from .data import TaskData, _bundle

# folders that are not the standard library proper (tests, installed packages, caches)
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
EOF_BYTE = 0  # never occurs in Python source: marks the end of each file


class TokenWindows(Dataset):
    """Non-overlapping windows of a token stream: ``(x, y)``, ``y`` is ``x`` shifted by one token."""

    unit = "tokens"

    def __init__(self, ids: torch.Tensor, context: int) -> None:
        if len(ids) < context + 1:
            raise ValueError(f"{len(ids)} {self.unit} hold no window of {context} + 1 {self.unit}")
        self.ids = ids
        self.context = context
        self.n = (len(ids) - 1) // context

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        s = i * self.context
        w = self.ids[s : s + self.context + 1].long()
        return w[:-1], w[1:]


class ByteWindows(TokenWindows):
    """Token windows over a byte string (one token per byte)."""

    unit = "bytes"

    def __init__(self, data: bytes, context: int) -> None:
        super().__init__(torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8), context)


def stdlib_files(root: str | None = None) -> list[str]:
    """The standard library's ``*.py`` files (paths relative to ``root``), sorted."""
    root = root or os.path.dirname(os.__file__)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root={root}: no such folder")
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _SKIP_DIRS]
        rel = os.path.relpath(d, root)
        out += [os.path.normpath(os.path.join(rel, f)) for f in files if f.endswith(".py")]
    return sorted(out)


def corpus(root: str | None, budgets: list[int], max_file_bytes: int, seed: int) -> tuple[list[bytes], list[list[str]]]:
    """Byte strings of the given sizes from disjoint sets of files (seeded file order)."""
    root = root or os.path.dirname(os.__file__)
    files = stdlib_files(root)
    random.Random(seed).shuffle(files)
    texts: list[bytes] = []
    used: list[list[str]] = []
    it = iter(files)
    for budget in budgets:
        parts: list[bytes] = []
        names: list[str] = []
        size = 0
        while size < budget:
            name = next(it, None)
            if name is None:
                raise ValueError(f"data: the standard library at {root} holds fewer bytes than the budgets {budgets}")
            with open(os.path.join(root, name), "rb") as f:
                text = f.read(max_file_bytes).replace(bytes([EOF_BYTE]), b"") + bytes([EOF_BYTE])
            parts.append(text)
            names.append(name)
            size += len(text)
        texts.append(b"".join(parts)[:budget])
        used.append(names)
    return texts, used


def unigram_perplexity(train: bytes, val: bytes, vocab: int = 256) -> float:
    """Perplexity on ``val`` of byte frequencies counted on ``train`` (add-one smoothing): the
    baseline a language model must beat."""
    counts = torch.bincount(torch.frombuffer(bytearray(train), dtype=torch.uint8).long(), minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    v = torch.frombuffer(bytearray(val), dtype=torch.uint8).long()
    return float(torch.exp(-logp[v].mean()))


def stdlib_text(
    context: int = 64,
    train_bytes: int = 1_000_000,
    val_bytes: int = 131_072,
    calib_samples: int = 256,
    max_file_bytes: int = 32_768,
    seed: int = 0,
    root: str | None = None,
) -> TaskData:
    """Byte-level LM data from CPython's stdlib sources; metric ``perplexity``, 256 classes.

    ``val`` is held-out files (``val_bytes``), ``train`` other files (``train_bytes``), ``calib`` a
    seeded subset of ``calib_samples`` training windows. ``root`` defaults to this interpreter's
    standard library.
    """
    if context < 1:
        raise ValueError(f"data.context={context}: must be a positive number of tokens")
    for key, v in (("train_bytes", train_bytes), ("val_bytes", val_bytes)):
        if v < context + 1:
            raise ValueError(f"data.{key}={v}: must hold at least one window of data.context + 1 = {context + 1} bytes")
    (val, train), _ = corpus(root, [val_bytes, train_bytes], max_file_bytes, seed)
    bundle = _bundle(ByteWindows(train, context), ByteWindows(val, context), calib_samples, seed, 256)
    bundle.metric = "perplexity"
    return bundle
