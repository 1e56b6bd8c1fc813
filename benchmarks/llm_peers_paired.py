"""Is hpcprune's default ahead of FLAP by more than the noise? The paired per-window NLL difference
(default - FLAP, mean +- standard error over the held-out windows), pruned and after the same recovery,
at each budget: the same plans, compensation, recovery and windows as ``llm_peers.py``.

    python benchmarks/llm_peers_paired.py --calib 16 --val-windows 48 --steps 5 --mem-layers '' --sens-npz FILE

Takes ``llm_peers.py``'s arguments; ``--sens-npz`` must hold a grid it measured (it is not measured here).
"""
import copy
import os
import sys

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llm_peers as P  # noqa: E402
from hpcprune import compensate, importance, metrics  # noqa: E402
from hpcprune.graph import Graph  # noqa: E402

args = P.parse()
torch.set_num_threads(1)
model,data,calib,val,example,ignore=P.lb.setup(args)
graph=Graph(model,example,ignore)
sens=dict(np.load(args.sens_npz,allow_pickle=True))
total=P.metrics.params(model); emb=model.hf.get_input_embeddings().weight.numel()
act={n[len("score:"):]: importance.prune_order(torch.from_numpy(v)) for n,v in sens.items() if n.startswith("score:")}
targets=compensate.prepare(graph, calib)
scores,bi,means,_=P.peer_scores(model,calib)

def per_window(m):
    out=[]
    with torch.inference_mode():
        for x,y in val:
            lg=metrics.logits_of(m(x)).float()
            nll=F.cross_entropy(lg.reshape(-1,lg.shape[-1]), y.reshape(-1), reduction="none").reshape(y.shape).mean(1)
            out.append(nll)
    return torch.cat(out).numpy()

def build(plan, fix):
    s=copy.deepcopy(model); Graph(s,example,ignore).apply_plan(plan)
    if fix: fix(s)
    return s

for remove in args.budgets:
    b=P.Budget(model,total-emb,remove)
    target=1.0-remove*(total-emb)/total - compensate.new_bias_params(model,targets)/total
    plan=P.hpcprune_plan(graph,model,example,sens,act,("neurons","heads","block"),target,args.ratios,"loss")
    flap=b.global_rank(*scores["flap"])
    res={}
    for name,(pl,fix) in {"default":(plan,P.compensated(graph,model,targets,plan)),"FLAP":(P.to_plan(graph,flap),P.flap_bias(model,flap,means))}.items():
        s=build(pl,fix); before=per_window(s)
        P.lb.recover(s, model, data, args.steps, args.lr, args.batch, seed=0); after=per_window(s)
        res[name]=(before,after); print(name, remove, "ppl", np.exp(before.mean()), np.exp(after.mean()), flush=True)
    for i,phase in enumerate(("pruned","recovered")):
        d=res["default"][i]-res["FLAP"][i]
        print(f"{remove} {phase}: default - FLAP per-window NLL {d.mean():+.4f} +- {d.std(ddof=1)/np.sqrt(len(d)):.4f} (n={len(d)}; default lower in {(d<0).sum()} windows)", flush=True)
