"""data=text_files (hpcprune.zoo.text_files): the user's plain text and JSON-lines files as token
windows, with a real tokenizer folder made here with the ``tokenizers`` library (a word-level
vocabulary; nothing downloaded) and byte-level ids: the token stream, the windows, the
val / calibration / training split by fraction, a JSON-lines text field, and one-line errors for a
missing file, a bad record and bad fractions, as the sweep reports them."""
import json

import pytest
import torch

from hpcprune.config import ConfigError, instantiate
from hpcprune.runs import build_data
from hpcprune.zoo import text_files as tfiles

from conftest import compose

WORDS = [f"w{i}" for i in range(60)]


def tiny_tokenizer(folder):
    """A word-level fast tokenizer over WORDS ([UNK] 0, </s> 1 = end of sequence), saved as
    transformers saves one: AutoTokenizer.from_pretrained(folder) loads it offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from hpcprune.zoo.hf import _transformers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "</s>", *WORDS])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    _transformers().PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(str(folder))
    return str(folder)


def words(n, seed):
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())


def test_byte_windows_and_split_by_fraction(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 500)
    (tmp_path / "b.txt").write_text("é" * 150)  # 2 UTF-8 bytes each
    stream = [ord("x")] * 500 + [0] + [0xC3, 0xA9] * 150 + [0]  # every document ends with a 0 byte
    d = tfiles.text_files([str(tmp_path / "*.txt")], tokenizer="bytes", window=16, val_fraction=0.2, calib_fraction=0.1, seed=0)
    n = (len(stream) - 1) // 16  # 50 windows of 16 + 1 tokens
    assert (len(d.val), len(d.calib), len(d.train)) == (10, 5, 35) and n == 50
    assert d.metric == "perplexity" and d.num_classes == 256 and d.example_input.shape == (8, 16)
    ids = torch.tensor(stream)
    x, y = d.val[len(d.val) - 1]
    assert torch.equal(x, ids[49 * 16:50 * 16]) and torch.equal(y, ids[49 * 16 + 1:50 * 16 + 1])  # val: the end, next tokens
    starts = lambda ds: {int(ds.indices[i]) for i in range(len(ds))}  # noqa: E731
    assert starts(d.val) == set(range(40, 50))
    assert starts(d.calib) | starts(d.train) == set(range(40)) and not starts(d.calib) & starts(d.train)
    again = tfiles.text_files([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], window=16, val_fraction=0.2, calib_fraction=0.1)
    other = tfiles.text_files([str(tmp_path / "*.txt")], window=16, val_fraction=0.2, calib_fraction=0.1, seed=1)
    assert starts(again.calib) == starts(d.calib) != starts(other.calib)


def test_jsonl_records_through_a_tokenizer_folder(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    docs = [words(30, i) for i in range(6)]
    with open(tmp_path / "d.jsonl", "w") as fh:
        for i, doc in enumerate(docs):
            fh.write(json.dumps({"id": i, "body": doc}) + "\n" + ("\n" if i == 2 else ""))  # a blank line is skipped
    (tmp_path / "plain.txt").write_text(docs[0])
    from hpcprune.zoo.hf import load_tokenizer

    enc = load_tokenizer(tok)
    want = [t for doc in docs for t in enc(doc, add_special_tokens=False)["input_ids"] + [1]]
    want += enc(docs[0], add_special_tokens=False)["input_ids"] + [1]
    assert len(want) == 7 * 31 and 0 not in want  # one id per word, </s> after each document, no unknown word
    got = tfiles.token_stream([str(tmp_path / "d.jsonl"), str(tmp_path / "plain.txt")], tok, text_field="body")
    assert got.tolist() == want
    d = tfiles.text_files([str(tmp_path / "d.jsonl"), str(tmp_path / "plain.txt")], tokenizer=tok, text_field="body", window=8,
                          val_fraction=0.25, calib_fraction=0.25)
    assert d.num_classes == 62 and len(d.val) + len(d.calib) + len(d.train) == (len(want) - 1) // 8 == 27
    with pytest.raises(ValueError, match=r"data.text_field=text: .*d.jsonl record 1 has no 'text' string \(its keys: id, body\)"):
        tfiles.text_files([str(tmp_path / "d.jsonl")], tokenizer=tok, window=8)


def _data_error(overrides):
    cfg = compose(["data=text_files", *overrides])
    with pytest.raises(ConfigError) as e:
        instantiate("data", build_data, cfg.data)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_input_is_one_line_naming_it(tmp_path):
    """As the sweep builds data (config.instantiate): one line that names the file or key."""
    (tmp_path / "a.txt").write_text("hello " * 100)
    missing = tmp_path / "nope.txt"
    assert _data_error([f"data.paths=[{tmp_path / 'a.txt'},{missing}]"]) == f"data.paths: {missing}: no such file"
    assert "no such file" in _data_error([f"data.paths=[{tmp_path}/*.jsonl]"])
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    assert _data_error([f"data.paths=[{tmp_path / 'bad.jsonl'}]"]).startswith(f"data.paths: {tmp_path / 'bad.jsonl'} line 2 is not JSON")
    assert _data_error([f"data.paths=[{tmp_path / 'a.txt'}]", "data.val_fraction=0.6", "data.calib_fraction=0.5"]).startswith(
        "data.val_fraction + data.calib_fraction = 1.1")
    assert "too few" in _data_error([f"data.paths=[{tmp_path / 'a.txt'}]", "data.window=300"])
    assert _data_error([f"data.paths=[{tmp_path / 'a.txt'}]", f"data.tokenizer={tmp_path / 'tok'}"]).startswith(
        f"data.tokenizer={tmp_path / 'tok'}: no such folder")
