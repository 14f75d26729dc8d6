"""Fleet scale on a real engine: the README's distributed example, run as written
on a Dask distributed LocalCluster with worker *processes* (tasks and results
cross a process boundary by pickling, as on a multi-node cluster).

Why Dask distributed: it installs from PyPI as pure-Python wheels on every
Python this project supports (3.9 … 3.13), starts in a second with no JVM
(PySpark needs Java) and no daemons or large native wheels (Ray), and its
LocalCluster is the same scheduler/worker protocol as a real cluster.
Install with ``pip install ".[fleet]"``; without it the test is skipped, and the
skip reason says so."""
import os

import pytest

import gradience_lite as gl
from conftest import FIXTURES, PEFT_FIXTURES

distributed = pytest.importorskip(
    "distributed", reason="Dask distributed is not installed: `pip install '.[fleet]'` to run the fleet example")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                       silence_logs=40)
    with distributed.Client(cluster) as dask_client:
        yield dask_client
    cluster.close()


ADAPTERS = [PEFT_FIXTURES / "llama_fp16", PEFT_FIXTURES / "llama_patterns", FIXTURES / "formats" / "kohya_sdxl",
            FIXTURES / "formats" / "mlx_lm", FIXTURES / "formats" / "no_such_adapter"]


def test_the_readme_example_audits_a_fleet_on_worker_processes(client):
    # As in the README: one adapter → one JSON-ready dict, never raises.
    paths = [str(path) for path in ADAPTERS]
    options = {"layers": True, "top_singular_values": 2}
    futures = client.map(gl.batch_audit_line, paths, [options] * len(paths), pure=False)
    rows = client.gather(futures)

    worker_pids = set(client.run(lambda: os.getpid()).values())
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids  # really other processes

    assert [row["path"] for row in rows] == paths
    for path, row in zip(paths[:-1], rows[:-1]):
        # Oracle: the same audit in this process (its numbers are checked against dense SVD elsewhere).
        expected = gl.audit_lora_peft_dir(path, include_top_singular_values=2).to_summary_dict(include_layers=True)
        assert row["ok"], row.get("error")
        assert row["n_layers"] == expected["n_layers"] and row["format"] == expected["format"]
        assert row["utilization_mean"] == pytest.approx(expected["utilization_mean"], rel=1e-12)
        for got, want in zip(row["layers"], expected["layers"]):
            assert got["name"] == want["name"]
            assert got["top_singular_values"] == pytest.approx(want["top_singular_values"], rel=1e-12)
    assert not rows[-1]["ok"] and "no_such_adapter" in rows[-1]["error"]


def test_in_memory_tensors_map_over_the_cluster_too(client):
    # The README's other route: tensors already in memory → audit_lora_state_dict.
    import numpy as np

    rng = np.random.default_rng(0)
    items = [{"base_model.model.q_proj.lora_A.weight": rng.normal(size=(4, 16)),
              "base_model.model.q_proj.lora_B.weight": rng.normal(size=(8, 4))} for _ in range(4)]

    def audit(tensors):
        return gl.audit_lora_state_dict(tensors, {"r": 4, "lora_alpha": 8}).to_summary_dict()

    rows = client.gather(client.map(audit, items, pure=False))
    for tensors, row in zip(items, rows):
        sigma = np.linalg.svd(tensors["base_model.model.q_proj.lora_B.weight"]
                              @ tensors["base_model.model.q_proj.lora_A.weight"], compute_uv=False)
        assert row["stable_rank_mean"] == pytest.approx(np.sum(sigma ** 2) / sigma[0] ** 2, rel=1e-10)
