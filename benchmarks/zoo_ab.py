"""Seconds of the zoo's sweeps, an older commit against this tree, side by side (not run in CI).

    .venv-vision/bin/python benchmarks/zoo_ab.py --base REV [--models a,b,c] [--timeout 600]
        [--root DIR] [--out DIR] [--log benchmarks/results/zoo_ab.log]

For each model it runs ``benchmarks/zoo_coverage.py`` (one sweep and its checks) twice at the same
time, one process per core: once in a ``git worktree`` of ``--base`` (made under ``--out``, removed
afterwards) and once in this tree. Both sweeps of a model share the machine's state (its load, its
memory bandwidth, a clock that drifts from one day to the next), so their ratio holds where their
seconds alone would not be comparable with another day's. Prints a markdown table (CPU seconds and
wall seconds of each side, the ratio, whether both completed with the same groups kept and excluded)
and, as its last line, one JSON object with the per-model ratios and their geometric mean. The base
must have ``zoo_coverage.py`` with ``--jobs``, ``--models``, ``--out``, ``--root`` and ``--log``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
_LINE = re.compile(r"^- (\S+): (\w+) in ([\d.]+) s \(([\d.]+) CPU s\)")


def _one(tree: str, name: str, a: argparse.Namespace, out: str, result: dict) -> None:
    """zoo_coverage.py for ``name`` in ``tree``; its line of seconds and its table row into ``result``."""
    log = os.path.join(out, f"{name}.log")
    cmd = [sys.executable, os.path.join(tree, "benchmarks", "zoo_coverage.py"), "--jobs", "1", "--models", name,
           "--timeout", str(a.timeout), "--out", out, "--log", log]
    if a.root:
        cmd += ["--root", a.root]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        m = _LINE.match(line)
        if m and m.group(1) == name:
            result.update(status=m.group(2), wall=float(m.group(3)), cpu=float(m.group(4)))
        if line.startswith(f"| {name} |"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            result["groups"] = (cells[4], cells[5].split(" ")[0])  # kept, excluded
    if "cpu" not in result:
        result.update(status=f"no result (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:] or ''}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the git revision to compare this tree against")
    ap.add_argument("--models", default="efficientnet_v2_l,vit_h_14,swin_v2_b,swin_b,swin_v2_s,densenet201,"
                                        "efficientnet_b7,regnet_y_32gf,wide_resnet101_2,densenet161")
    ap.add_argument("--timeout", type=int, default=600, help="CPU seconds per sweep (zoo_coverage.py --timeout)")
    ap.add_argument("--root", help="where the digits ImageFolders go (zoo_coverage.py --root)")
    ap.add_argument("--out", default=None, help="run directories and the base's worktree (default: a temp dir)")
    ap.add_argument("--log", default=os.path.join(HERE, "results", "zoo_ab.log"))
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="hpcprune_zoo_ab_")
    base_tree = os.path.join(out, "base")
    rev = subprocess.run(["git", "rev-parse", "--short", a.base], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    if os.path.exists(base_tree):
        subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=REPO, capture_output=True)
    subprocess.run(["git", "worktree", "add", "--detach", base_tree, rev], cwd=REPO, check=True, capture_output=True)
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"# zoo A/B: base {rev} against this tree ({head}{' with uncommitted changes' if dirty else ''}), "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}; each model's two sweeps at the same time, one per core")
    rows = []
    try:
        for name in [m.strip() for m in a.models.split(",") if m.strip()]:
            res: dict[str, dict] = {"base": {}, "head": {}}
            threads = [threading.Thread(target=_one, args=(tree, name, a, os.path.join(out, f"runs_{side}"), res[side]))
                       for side, tree in (("base", base_tree), ("head", REPO))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            b, h = res["base"], res["head"]
            ratio = h["cpu"] / b["cpu"] if "cpu" in b and "cpu" in h and b["cpu"] > 0 else float("nan")
            rows.append((name, b, h, ratio))
            say(f"- {name}: base {b.get('status')} {b.get('cpu', float('nan')):.1f} CPU s, this tree {h.get('status')} "
                f"{h.get('cpu', float('nan')):.1f} CPU s ({ratio:.2f}x)")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=REPO, capture_output=True)
        if a.out is None:
            shutil.rmtree(out, ignore_errors=True)
    say("")
    say(f"| model | CPU s {rev} | CPU s this tree | ratio | wall s {rev} | wall s this tree | same groups (kept, excluded) |")
    say("| --- | --- | --- | --- | --- | --- | --- |")
    for name, b, h, ratio in rows:
        same = "yes" if b.get("groups") and b.get("groups") == h.get("groups") else f"{b.get('groups')} / {h.get('groups')}"
        say(f"| {name} | {b.get('cpu', float('nan')):.1f} | {h.get('cpu', float('nan')):.1f} | {ratio:.2f} | "
            f"{b.get('wall', float('nan')):.1f} | {h.get('wall', float('nan')):.1f} | {same} |")
    ok = [r for *_, r in rows if math.isfinite(r)]
    gmean = math.exp(sum(math.log(r) for r in ok) / len(ok)) if ok else float("nan")
    over = [name for name, _, h, _ in rows if h.get("cpu", math.inf) > 60.0]
    say(f"geometric mean ratio (this tree / base, CPU s): {gmean:.3f}; over 60 CPU s in this tree: {len(over)} of {len(rows)}")
    summary = {"base": rev, "head": head, "dirty": dirty, "gmean_ratio": round(gmean, 4) if ok else None, "over_60_cpu_s": over,
               "models": {name: {"base_cpu_s": b.get("cpu"), "cpu_s": h.get("cpu"), "ratio": round(r, 4) if math.isfinite(r) else None}
                          for name, b, h, r in rows}}
    say(json.dumps(summary))
    os.makedirs(os.path.dirname(os.path.abspath(a.log)), exist_ok=True)
    with open(a.log, "a") as fh:
        fh.write("\n".join(lines) + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
