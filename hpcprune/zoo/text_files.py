"""Language modelling on the user's own text: plain text files and JSON-lines files (``data=text_files
data.paths=[...]``), tokenized with the model's own tokenizer.

Documents: a plain text file is one document; a JSON-lines file (``.jsonl``, ``.ndjson``, or ``.json``
holding one object per line or one list of objects) holds one document per record, its
``text_field`` string. Paths may be glob patterns (``data/*.jsonl``, sorted). Every document is
tokenized without special tokens and ends with the tokenizer's end-of-sequence token (a 0 byte for
``bytes``), and all are joined, in the order given, into one token stream.

Samples are non-overlapping windows of ``window`` tokens; the target is the next token at every
position (metric ``perplexity``). The windows are split by fraction: the last ``val_fraction`` of
them (the end of the last files: held-out text) are ``val``, ``calib_fraction`` of them, drawn with
``seed`` from the rest, are the calibration set (sensitivity and importance scores), and the others
are ``train`` (dense training and recovery fine-tuning); the three are disjoint.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Subset

from .data import TaskData
from .text import EOF_BYTE, TokenWindows

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


def text_files(
    paths: Sequence[str] | str,
    tokenizer: str = "bytes",
    text_field: str = "text",
    window: int = 128,
    val_fraction: float = 0.1,
    calib_fraction: float = 0.1,
    seed: int = 0,
    context: int | None = None,
) -> TaskData:
    """Token windows of the documents in ``paths`` (module docstring); metric ``perplexity``,
    ``num_classes`` = the tokenizer's vocabulary.

    ``tokenizer``: a local tokenizer folder (a model directory: ``model.path``), a ``.gguf`` file
    (its vocabulary), ``smollm2`` or ``bytes`` (UTF-8, 256 ids). ``context``: the window again, for
    model configs that read ``data.context`` (must equal ``window``). Raises FileNotFoundError naming a path that matches no
    file, ValueError (one line naming the ``data.`` key) for a bad fraction, window, record or a
    text too short for one window per split.
    """
    if window < 1:
        raise ValueError(f"data.window={window}: must be a positive number of tokens")
    if context is not None and int(context) != int(window):
        raise ValueError(f"data.context={context}: must equal data.window={window} (leave it as ${{.window}})")
    for key, f in (("val_fraction", val_fraction), ("calib_fraction", calib_fraction)):
        if not 0.0 < float(f) < 1.0:
            raise ValueError(f"data.{key}={f}: must lie in (0, 1)")
    if val_fraction + calib_fraction >= 1.0:
        raise ValueError(f"data.val_fraction + data.calib_fraction = {val_fraction + calib_fraction:g}: must stay "
                         "below 1 (the rest is the training text)")
    files = expand_paths(paths)
    tokenizer = tokenizer if tokenizer in ("bytes", "smollm2") else os.path.expanduser(str(tokenizer))
    ids = token_stream(files, tokenizer, text_field)
    windows = TokenWindows(ids, window) if len(ids) > window else None
    n = len(windows) if windows is not None else 0
    n_val, n_calib = max(1, round(val_fraction * n)), max(1, round(calib_fraction * n))
    if windows is None or n - n_val - n_calib < 1:
        raise ValueError(f"data.paths: {len(ids)} tokens ({tokenizer}) in {len(files)} file(s) make {n} windows of "
                         f"data.window={window}, too few for val, calibration and training windows (at least 3)")
    perm = torch.randperm(n - n_val, generator=torch.Generator().manual_seed(int(seed))).tolist()
    train = Subset(windows, sorted(perm[n_calib:]))
    example = torch.stack([train[i][0] for i in range(min(8, len(train)))])
    from .hf import vocab_size

    return TaskData(train=train, val=Subset(windows, list(range(n - n_val, n))), calib=Subset(windows, sorted(perm[:n_calib])),
                    example_input=example, num_classes=vocab_size(tokenizer), metric="perplexity")


def expand_paths(paths: Sequence[str] | str) -> list[str]:
    """``paths`` with glob patterns expanded (sorted, in the order given). Raises FileNotFoundError
    naming the first path or pattern that matches no file."""
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise ValueError("data.paths=[]: give at least one text or JSON-lines file (data.paths=[a.txt,b.jsonl])")
    out: list[str] = []
    for p in paths:
        p = os.path.expanduser(str(p))
        found = sorted(f for f in glob.glob(p) if os.path.isfile(f)) if glob.has_magic(p) else [p] if os.path.isfile(p) else []
        if not found:
            raise FileNotFoundError(f"data.paths: {p}: no such file" + (" (a folder: give its files, e.g. DIR/*.txt)"
                                                                        if os.path.isdir(p) else ""))
        out += found
    return out


def documents(path: str, text_field: str = "text") -> Iterator[str]:
    """The documents of one file: the whole text of a plain file; the ``text_field`` string of every
    record of a JSON-lines file. Raises ValueError naming the file and line of a bad record."""
    with open(path, encoding="utf-8") as fh:
        if not path.lower().endswith(JSONL_SUFFIXES):
            yield fh.read()
            return
        text = fh.read()
    if text.lstrip().startswith("["):  # one JSON list of records
        try:
            records = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise ValueError(f"data.paths: {path}: not JSON ({e.msg} at line {e.lineno})") from None
    else:
        records = [(i, _record(path, i, line)) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    for i, rec in records:
        value = rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(value, str):
            raise ValueError(f"data.text_field={text_field}: {path} record {i} has no {text_field!r} string "
                             f"(its keys: {', '.join(map(str, rec)) if isinstance(rec, dict) else type(rec).__name__})")
        yield value


def _record(path: str, line_no: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"data.paths: {path} line {line_no} is not JSON ({e.msg})") from None


def token_stream(files: Sequence[str], tokenizer: str, text_field: str = "text") -> torch.Tensor:
    """All documents of ``files`` as one stream of token ids (int32), each document ending with the
    tokenizer's end-of-sequence id (a 0 byte for ``bytes``; nothing when the tokenizer has none)."""
    parts: list[torch.Tensor] = []
    if tokenizer == "bytes":
        for f in files:
            for doc in documents(f, text_field):
                data = doc.encode("utf-8").replace(bytes([EOF_BYTE]), b"") + bytes([EOF_BYTE])
                parts.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int32))
    else:
        from .hf import load_tokenizer

        gguf = tokenizer.lower().endswith(".gguf")
        if tokenizer != "smollm2" and not (os.path.isfile(tokenizer) if gguf else os.path.isdir(tokenizer)):
            raise FileNotFoundError(f"data.tokenizer={tokenizer}: no such " + ("file" if gguf else "folder (a tokenizer or "
                                    "model directory, a .gguf file, smollm2 or bytes)") + "; data.tokenizer is model.path "
                                    "unless given: check model.path")
        try:
            tok = load_tokenizer(tokenizer)
        except Exception as e:  # transformers' message stops mid-sentence on the first line
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise ValueError(f"data.tokenizer={tokenizer}: no tokenizer loads from it ({type(e).__name__}: {first[:160]}); "
                             "it needs the files a tokenizer's save_pretrained writes (tokenizer.json or "
                             "tokenizer.model / vocab files, tokenizer_config.json): give data.tokenizer= a folder "
                             "that has them (or bytes)") from None
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        for f in files:
            for doc in documents(f, text_field):
                ids = tok(doc, add_special_tokens=False, verbose=False)["input_ids"]
                parts.append(torch.tensor(list(ids) + eos, dtype=torch.int32))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)
