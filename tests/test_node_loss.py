"""A worker node lost mid-job (its Ray processes killed): the job completes, nothing lost or doubled."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from segbatch.masks import decode_png_label_map
from segbatch.pipeline import RunResult, run_job
from segbatch.outputs import read_rows
from segbatch.spec import parse_job
from tests.varied import assert_varied_labels, write_rich_scenes

N_IMAGES = 24


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # The head runs only the driver (0 CPUs); all work lands on the two worker nodes.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    assert c.address.startswith("127.0.0.1:"), "conftest keeps Ray on loopback"
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def spec_for(root: Path, out: str):
    return parse_job(
        {
            "name": "node-loss",
            "input": {"uri": str(root / "in")},
            "model": {"task": "semantic", "weights": "builtin:shapes", "batch_size": 2},
            "output": {"uri": str(root / out), "commit_rows": 2, "commit_seconds": 0.2},
            "compute": {"actors": 1, "load_batch_size": 2},
        }
    )


def rows(out: Path) -> dict[str, np.ndarray]:
    table = read_rows(str(out), {}).to_pylist()
    ids = [r["item_id"] for r in table]
    assert len(ids) == len(set(ids)), "duplicated rows"
    assert all(r["status"] == "ok" for r in table), [r["error"] for r in table if r["status"] != "ok"]
    return {r["item_id"]: decode_png_label_map(Path(r["mask_uri"]).read_bytes()) for r in table}


def test_worker_node_lost_mid_job(cluster: Cluster, tmp_path: Path) -> None:
    write_rich_scenes(tmp_path / "in", count=N_IMAGES, seed=10_000_100)
    cluster.add_node(num_cpus=2)
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()

    clean = run_job(spec_for(tmp_path, "clean"))
    assert clean.ok == N_IMAGES
    reference = rows(tmp_path / "clean")
    assert_varied_labels(list(reference.values()), min_fraction=0.75)

    outcome: dict[str, RunResult | BaseException] = {}

    def target() -> None:
        try:
            outcome["result"] = run_job(spec_for(tmp_path, "lossy"))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = e

    worker_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0}
    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.time() + 120
    out = tmp_path / "lossy"
    while time.time() < deadline and thread.is_alive():
        if (out / "metadata").exists() and read_rows(str(out), {}).num_rows >= 4:
            break
        time.sleep(0.05)
    # Remove the node hosting the predict actor, so in-flight work is really lost.
    import ray._private.state as gcs_state  # GCS table: works without the dashboard

    actor_nodes = {
        a["Address"]["NodeID"]
        for a in gcs_state.actors(actor_state_name="ALIVE").values()
        if "MapWorker" in a.get("ActorClassName", "")
    }
    assert actor_nodes & worker_nodes, "predict actor not found on a worker node"
    victim = next(n for n in cluster.worker_nodes if n.node_id in actor_nodes)
    committed_at_kill = read_rows(str(out), {}).num_rows
    assert committed_at_kill < N_IMAGES, "job finished before the node was removed"
    cluster.remove_node(victim, allow_graceful=False)
    thread.join(timeout=300)
    assert not thread.is_alive(), "job hung after node loss"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert isinstance(result, RunResult) and result.ok == N_IMAGES and not result.errors

    lossy = rows(out)
    assert lossy.keys() == reference.keys()
    for item_id, mask in lossy.items():
        assert mask.shape == reference[item_id].shape and (mask == reference[item_id]).mean() >= 0.999, item_id
    print(f"node loss: {N_IMAGES} items, node removed after {committed_at_kill} committed, lost 0, duplicates 0")
