"""jobs/mixmfl in NVFlare's own simulator at a tiny size, with the privacy audit of every payload."""

from __future__ import annotations

import json

import pytest

from fedmodal.nets.mixmfl import key_group
from sim import TINY_NETS, read_audit, run_job, site_modalities

pytestmark = pytest.mark.integration

SITES = [f"site-{k}" for k in range(1, 7)]
TINY = {
    **TINY_NETS["mixmfl"],
    "min_cluster_size": 3,
    "kmeans_k": 2,
    "num_rounds": 2,
    "task_timeout": 600,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from fedmodal.data.phantoms import build_federation

    tmp = tmp_path_factory.mktemp("mixmfl")
    data = build_federation(tmp / "data", shape=(32, 32, 24), cases_per_site=4, test_cases=1, preset="mixmfl")
    ws, _ = run_job("mixmfl", TINY, tmp, data, sites=6, timeout=900)
    return ws, site_modalities(data, SITES)


audit = read_audit


def test_the_job_finishes_and_scores_every_site_on_its_own_test_split(run):
    ws, _ = run
    out = ws / "server" / "simulate_job" / "mixmfl"
    results = json.loads((out / "per_site.json").read_text())
    assert sorted(results["results"]) == SITES
    for site, metrics in results["results"].items():
        for region in ("WT", "TC", "ET"):
            assert 0.0 <= metrics[f"dice_{region}"] <= 1.0, (site, metrics)
    assert (out / "checkpoint.pt").is_file()


def test_each_site_sends_only_its_groups_and_prototypes_of_what_it_holds(run):
    ws, held = run
    for site in SITES:
        sent = [r for r in audit(ws, site) if r["direction"] == "out" and r["task"] == "train"]
        assert len(sent) == TINY["num_rounds"]
        for record in sent:
            groups = {key_group(k) for k in record["items"] if not k.startswith("memory.")}
            assert groups == {"enc.shared", "fuse", "cls", "dec"} | {f"enc.{m}" for m in held[site]}, site
            for key, item in record["items"].items():
                if key.startswith("memory."):
                    assert key.removeprefix("memory.") in held[site]
                    rows, width = item["shape"]
                    assert 1 <= rows <= TINY["kmeans_k"] and width == TINY["features"][-1]  # centres, not samples


def test_each_site_receives_the_memory_of_what_it_lacks_and_no_foreign_encoder(run):
    ws, held = run
    for site in SITES:
        received = [r for r in audit(ws, site) if r["direction"] == "in" and r["task"] == "train"]
        assert len(received) == TINY["num_rounds"]
        for i, record in enumerate(received):
            tailored = {
                k.split(".")[1] for k in record["items"] if k.startswith("enc.") and not k.startswith("enc.shared.")
            }
            assert tailored == held[site]
            memory = {k.removeprefix("memory.") for k in record["items"] if k.startswith("memory.")}
            assert not memory & held[site]
            if i > 0:  # after the first round the other sites have written prototypes
                assert memory == {"t1", "t1ce", "t2", "flair"} - held[site]
