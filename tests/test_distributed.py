"""``explain_task`` under ``torch.distributed``: two CPU processes (gloo), launched by
``torchrun``, equal a one-process run.

``tests/dist_task_worker.py`` runs on both ranks; each saves what ``explain_task`` returned
on it. The exact reference is the one-process run of each rank's shard (items ``i`` with
``i % 2 == rank``: the same batches), merged in rank order: the distributed result equals
it to :data:`DIST_ATOL`. Against the one-process run of the whole task (other batches, so
other padding) the values agree to the completeness tolerance.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist

import tlprisms as tp
from tlprisms._core.result import tolerance
from tlprisms.demo import load_demo_model
from tlprisms.distributed import world

#: the 2-process statistics vs the merged 1-process statistics of the same shards
DIST_ATOL = 1e-6
WORKER = Path(__file__).with_name("dist_task_worker.py")
SPLIT = {"heads": "all", "neurons": "all"}
NUMERIC = ["mean", "std", "min", "max", "mean_share", "mean_abs"]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return out, got


@pytest.fixture(scope="module")
def model():
    return load_demo_model()


def task():
    from tlprisms.demo import addition_task, capital_task

    return capital_task()[:23] + addition_task()[:30]


def frame(d: dict) -> pd.DataFrame:
    return pd.DataFrame(d).set_index("component")


def test_every_rank_returns_the_same_result(ranks):
    _, (r0, r1) = ranks
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert r0["n"] == r1["n"] == len(task())
    for k in (5, 10):
        pd.testing.assert_frame_equal(frame(r0["summary"][k]), frame(r1["summary"][k]))
    assert torch.equal(r0["values"], r1["values"]) and r0["prompts"] == r1["prompts"]


def test_two_processes_equal_one_process(ranks, model):
    _, (r0, _) = ranks
    rows = task()
    shards = [
        tp.explain_task(
            model, iter(rows[r::2]), keep="stats", batch_size=5, progress=False, **SPLIT
        )
        for r in (0, 1)
    ]
    merged = shards[0].merge(shards[1])
    whole = tp.explain_task(model, rows, batch_size=5, progress=False, **SPLIT)
    tol = tolerance(whole.precision, whole.n_layers) * max(1.0, float(whole.logits.abs().max()))
    for k in (5, 10):
        got = frame(r0["summary"][k])
        want = frame(merged.summary(k=k).to_dict("list")).loc[got.index]
        ref = frame(whole.summary(k=k).to_dict("list")).loc[got.index]
        for col in [*NUMERIC, f"frac_top{k}"]:
            np.testing.assert_allclose(got[col], want[col], rtol=0, atol=DIST_ATOL, err_msg=col)
        for col in NUMERIC:
            np.testing.assert_allclose(got[col], ref[col], rtol=0, atol=tol, err_msg=col)
    # keep="values": every prompt back in task order
    heads = tp.explain_task(model, rows, heads="all", batch_size=5, progress=False)
    assert r0["prompts"] == [p for p, _ in rows]
    assert float((r0["values"] - heads.values).abs().max()) <= tol
    assert float((r0["logits"] - heads.logits).abs().max()) <= tol


def test_one_parquet_file_per_rank(ranks):
    out, (r0, r1) = ranks
    assert r0["meta"]["parquet"] == str(out / "terms-rank0.parquet")
    assert r1["meta"]["parquet"] == str(out / "terms-rank1.parquet")
    parts = [pd.read_parquet(out / f"terms-rank{r}.parquet") for r in (0, 1)]
    for r, df in enumerate(parts):
        assert set(df["index"] % 2) == {r}
    both = pd.concat(parts)
    assert sorted(both["index"].unique()) == list(range(len(task())))
    assert len(both) == len(task()) * (4 + 1)


def test_without_a_process_group():
    assert world(None) == (0, 1) and world(False) == (0, 1)
