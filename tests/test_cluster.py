"""Multi-node on one machine: a real head and a second node, jobs submitted with `ray job submit`."""

from __future__ import annotations

import re

import pyarrow.parquet as pq
import pytest
from conftest import RayCluster


@pytest.mark.slow
def test_two_nodes_train_then_predict(tmp_path, data_root):
    shared = tmp_path / "shared"  # stands in for NFS/S3: every node sees it
    with RayCluster(port=6489, dashboard_port=8376, cpus=2, extra_nodes=1) as cluster:
        # 1.5 CPUs per worker on 2-CPU nodes: the two workers must land on different nodes
        train = cluster.submit("jobs/train.py", "--config", "configs/smoke.yaml", "scaling.num_workers=2",
                               "scaling.cpus_per_worker=1.5", f"output_dir={shared}/run", f"storage_path={shared}/ray",
                               f"data.root={data_root}", "train.epochs=1", "data.max_train_rows=128")
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        nodes = set(re.findall(r"\[bertray\] worker \d/2 on node (\w+)", train.stdout))
        assert len(nodes) == 2, train.stdout[-3000:]
        predict = cluster.submit("jobs/predict.py", "--config", "configs/predict.yaml", f"model.path={shared}/run/model",
                                 f"input={data_root}/trec/test.parquet", f"output={shared}/preds/dt={{date}}",
                                 "date=2026-01-02")
        assert predict.returncode == 0, predict.stdout[-3000:] + predict.stderr[-3000:]
    out = pq.read_table(shared / "preds" / "dt=2026-01-02")
    assert out.num_rows == pq.read_metadata(data_root / "trec" / "test.parquet").num_rows
    assert {"text", "label", "prediction", "score"} <= set(out.column_names)
