"""One rank of tests/test_distributed.py (run by ``torchrun --nproc_per_node 2``).

Runs ``explain_task`` on the demo model under the gloo process group: ``keep="stats"`` with
Parquet output and ``keep="values"``, and saves what this rank got to ``OUT/rank{r}.pt``.
"""

import os
import sys

import torch
import torch.distributed as dist

import tlprisms as tp
from tlprisms.demo import addition_task, capital_task, load_demo_model

torch.set_num_threads(1)
out = sys.argv[1]
kind = sys.argv[2] if len(sys.argv) > 2 else "bridge"
dist.init_process_group("gloo")
rank = dist.get_rank()
model = load_demo_model(kind=kind)
task = capital_task()[:23] + addition_task()[:30]
rows = ({"prompt": p, "answer": a} for p, a in task)  # a generator, read by every rank
st = tp.explain_task(
    model,
    rows,
    keep="stats",
    heads="all",
    neurons="all",
    batch_size=5,
    progress=False,
    parquet=os.path.join(out, "terms.parquet"),
    parquet_k=4,
)
res = tp.explain_task(model, task, heads="all", batch_size=5, progress=False)
torch.save(
    {
        "rank": rank,
        "world": dist.get_world_size(),
        "n": st.n,
        "summary": {k: st.summary(k=k).to_dict("list") for k in (5, 10)},
        "meta": st.meta,
        "values": res.values,
        "logits": res.logits,
        "prompts": res.prompts,
    },
    os.path.join(out, f"rank{rank}.pt"),
)
dist.destroy_process_group()
