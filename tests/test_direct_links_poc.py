"""Direct links between job processes over mutual TLS (`customize_site.py --direct-links`).

A provisioned localhost federation whose server kit lets each job's server process listen on
a port range (NVFlare's ad-hoc connections): the tiny ModalityBank job must run to the end
with every hospital's job process connected straight to it over TLS (an `stcp` URL in the
range), every step still audited at the site, and the hospitals' kits left as provisioned.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time

import pytest
from nvflare.apis.job_def import RunStatus

from fedmodal.fl.provisioned import direct_links
from poc import CUSTOMIZE, MB_JOB_TIMEOUT, SITES, log_tails, start_federation, tiny_modalitybank

FIRST_PORT, LAST_PORT = 8150, 8199


def customize_module():
    spec = importlib.util.spec_from_file_location("customize_site", CUSTOMIZE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("value", ["localhost", "localhost:", ":8100-8199", "localhost:81x0", "h:1-2-3"])
def test_a_malformed_direct_links_value_is_refused_by_name(value, tmp_path):
    with pytest.raises(SystemExit, match="--direct-links"):
        customize_module().main([str(tmp_path), "--direct-links", value])


def test_direct_links_are_mutual_tls_on_the_server_only():
    settings = customize_module().direct_link_settings("fedmodal-server.example.org", "8100-8199")
    assert settings["allow_adhoc_conns"] is True
    resources = settings["adhoc"]["resources"]
    assert resources == {
        "host": "fedmodal-server.example.org",
        "ports": "8100-8199",
        "connection_security": "mtls",
    }


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    yield from start_federation(
        tmp_path_factory, "direct-links", ("--direct-links", f"localhost:{FIRST_PORT}-{LAST_PORT}")
    )


@pytest.mark.integration
def test_modalitybank_job_processes_talk_over_direct_tls_links(federation, tmp_path):
    sess, prod = federation["admin"], federation["prod"]
    server_comm = json.loads((prod / "localhost" / "local" / "comm_config.json").read_text())
    assert server_comm["adhoc"]["resources"]["connection_security"] == "mtls"
    for site in SITES:  # the hospitals set nothing: they connect out to what the server offers
        assert not (prod / site / "local" / "comm_config.json").exists()

    t0 = time.time()
    job_id = sess.submit_job(tiny_modalitybank(tmp_path / "submit"))
    meta = sess.wait_for_job(job_id, timeout=MB_JOB_TIMEOUT, poll_interval=1.0)
    federation["mb_job_seconds"] = time.time() - t0
    assert meta["status"] == RunStatus.FINISHED_COMPLETED.value, f"{meta}\n{log_tails(federation, job_id)}"

    for site in SITES:
        log = (prod / site / job_id / "log.txt").read_text(errors="replace")
        urls = direct_links(prod / site / job_id / "log.txt")["connectors"]
        assert urls, f"{site}: no direct link to the server's job process\n{log_tails(federation, job_id)}"
        for url in urls:
            scheme, port = re.fullmatch(r"(\w+)://localhost:(\d+)", url).groups()
            assert scheme == "stcp", f"{site}: direct link {url} is not TLS"
            assert FIRST_PORT <= int(port) <= LAST_PORT, url
        assert "cannot create adhoc connector" not in log
        assert "CERTIFICATE_VERIFY_FAILED" not in log and "SSLError" not in log
        records = [
            json.loads(line)
            for line in (prod / site / job_id / "payload_audit.jsonl").read_text().splitlines()
            if line.strip()
        ]
        directions = [r["direction"] for r in records if r["task"] == "mb_step"]
        steps = 2 + 3  # MB_TINY_SERVER's pretrain + bank steps; every site holds T1 and two others
        assert (directions.count("in"), directions.count("out")) == (steps, steps), site
