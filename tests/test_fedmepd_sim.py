"""jobs/fedmepd in NVFlare's own simulator at a tiny size: a full-modal server and 8 clients;
personal filters, attention layers and the auxiliary decoder never leave a client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sim import TINY_NETS, read_audit, run_job, site_modalities

pytestmark = pytest.mark.integration

CLIENTS = [f"site-{k}" for k in range(1, 9)]
TINY = {
    **TINY_NETS["fedmepd"],
    "warmup_rounds": 0,
    "counter_start": 1,  # a filter whose update disagrees with the server's once becomes personal
    "num_rounds": 3,
    "task_timeout": 900,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from fedmodal.data.phantoms import build_federation

    tmp = tmp_path_factory.mktemp("fedmepd")
    data = build_federation(tmp / "data", shape=(32, 32, 24), cases_per_site=3, test_cases=1, preset="fedmepd")
    ws, _ = run_job("fedmepd", TINY, tmp, data, sites=8, timeout=1500)
    return ws, site_modalities(data, CLIENTS)


def audit(ws: Path, site: str, direction: str) -> list[dict]:
    return [r for r in read_audit(ws, site) if r["direction"] == direction and r["task"] == "train"]


def test_every_client_is_scored_and_the_server_keeps_masks_and_anchors(run):
    ws, held = run
    out = ws / "server" / "simulate_job" / "fedmepd"
    per_site = json.loads((out / "per_site.json").read_text())
    results = per_site["results"]
    assert sorted(results) == CLIENTS
    # Training and scoring name a client the same way (the reference code is off by one here):
    # each result is the client that trained with exactly its own modalities.
    assert {s: set(per_site["sites"][s]["modalities"]) for s in CLIENTS} == held
    assert all(0.0 <= results[s]["dice_WT"] <= 1.0 for s in CLIENTS)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["round"] == TINY["num_rounds"]
    assert sorted(state["state"]["counters"]) == CLIENTS  # the masks survive a restart with the checkpoint
    assert state["state"]["anchors"]  # and the anchors
    personal = json.loads((out / "personal_filters.json").read_text())["sites"]
    assert sum(p["personal_total"] for p in personal.values()) > 0  # counter_start 1: some filters went personal


def test_personal_filters_attention_and_aux_never_leave_a_client(run):
    ws, held = run
    state = torch.load(ws / "server/simulate_job/fedmepd/checkpoint.pt", weights_only=False)["state"]
    withheld_anywhere = 0
    for site in CLIENTS:
        sent, received = audit(ws, site, "out"), audit(ws, site, "in")
        assert len(sent) == len(received) == TINY["num_rounds"]
        withheld_before = 0
        for got, gave in zip(received, sent):
            assert not any(k.startswith(("attn.", "aux.")) for k in gave["items"]), site
            assert {k.split(".")[1] for k in gave["items"] if k.startswith("enc.")} == held[site]
            withheld = 0
            for key, item in gave["items"].items():
                if key.startswith("dec.") and key.endswith(".weight"):
                    full = got["items"][key]["shape"][0]  # the global decoder arrives whole
                    layer = key.rsplit(".", 1)[0]
                    assert gave["items"][f"decrows.{layer}"]["shape"] == [full]
                    withheld += full - item["shape"][0]  # personal rows are not in the payload at all
            assert withheld >= withheld_before, "a personal filter is permanent"
            withheld_before = withheld
        # What the site withheld in its last round is what the server had made personal by then.
        final = sum(int(v.sum()) for k, v in state["counters"][site].items() if "personal" in k)
        assert withheld_before <= final, (site, withheld_before, final)
        withheld_anywhere += withheld_before
        for got in received:
            assert {k.split(".")[1] for k in got["items"] if k.startswith("enc.")} == held[site]
            anchors = [i for k, i in got["items"].items() if k.startswith("anchor.")]
            assert anchors and all(i["shape"][0] <= 4 * 4 for i in anchors)  # per-class cluster means
    assert withheld_anywhere > 0  # the check above is not empty: some rows did stay home


def test_a_restarted_server_resumes_with_its_masks_and_anchors(run, tmp_path):
    import shutil

    ws, _ = run
    saved = tmp_path / "checkpoint.pt"
    shutil.copy(ws / "server/simulate_job/fedmepd/checkpoint.pt", saved)
    before = torch.load(saved, weights_only=False)["state"]
    data = ws.parent / "data"  # the fixture's federation
    values = {**TINY, "num_rounds": TINY["num_rounds"] + 1, "resume_from": str(saved)}
    _, log = run_job("fedmepd", values, tmp_path, data, sites=8, timeout=1500)
    assert f"at round {TINY['num_rounds']}" in log  # resumed, not restarted
    after = torch.load(tmp_path / "ws/server/simulate_job/fedmepd/checkpoint.pt", weights_only=False)
    assert after["round"] == TINY["num_rounds"] + 1
    for site, counters in before["counters"].items():
        for key, personal in counters.items():
            if key.startswith("personal."):
                assert (after["state"]["counters"][site][key] >= personal).all()  # no personal filter forgotten
    assert sorted(after["state"]["anchors"]) == sorted(before["anchors"])
