"""A provisioned federation on localhost: real server and three hospital processes over mutual TLS.

Provisions `provisioning/project.yml` (server renamed `localhost`, free port) into a temporary
folder with HOME there too, writes the site-local policies with `provisioning/customize_site.py`,
starts the server and hospital-1..3 as real processes (each with its own FEDMODAL_DATA_ROOT),
and as the project admin submits `jobs/site-inventory` through the FLARE API, waits, downloads
the result and checks `inventory.json`; then submits a tiny `jobs/modalitybank`, whose step
payloads travel from the server's job process to the sites' as direct (aux) messages, and checks
its summary and every site's payload audit. Also: a client holding a certificate from another
provisioning is refused; a member or an org admin cannot submit, a lead cannot download another's
job, and nobody can ship code (BYOC) to the sites.
Every process started here is stopped by its process group at the end.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path

import pytest
from nvflare.apis.job_def import RunStatus

from poc import (
    JOB_TIMEOUT,
    LEAD_2,
    MB_JOB,
    MB_JOB_TIMEOUT,
    MEMBER,
    ORG_ADMIN_1,
    SITES,
    connected_sites,
    job_copy,
    log_tails,
    provision,
    session,
    start_federation,
    tiny_modalitybank,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    yield from start_federation(tmp_path_factory)


def audit_filters_per_direction(site_kit: Path, chain: str) -> int:
    """How many PayloadAuditFilters a job without a scope passes through at this site in `chain`:
    the site's default privacy scope's (local/privacy.json) plus the modalitybank job's own."""
    privacy = json.loads((site_kit / "local" / "privacy.json").read_text())
    scope = next(s for s in privacy["scopes"] if s["name"] == privacy["default_scope"])
    in_scope = sum(f["path"] == "fedmodal.fl.audit.PayloadAuditFilter" for f in scope.get(chain, []))
    job = json.loads((MB_JOB / "app" / "config" / "config_fed_client.json").read_text())
    in_job = sum(
        f["path"] == "fedmodal.fl.audit.PayloadAuditFilter"
        for entry in job.get(chain, [])
        if "mb_step" in entry["tasks"]
        for f in entry["filters"]
    )
    return in_scope + in_job


def test_inventory_job_through_flare_api(federation, tmp_path):
    sess, prod = federation["admin"], federation["prod"]
    t0 = time.time()
    job_id = federation["job_id"] = sess.submit_job(job_copy(tmp_path / "submit"))
    meta = sess.wait_for_job(job_id, timeout=JOB_TIMEOUT, poll_interval=1.0)
    federation["job_seconds"] = time.time() - t0
    assert meta["status"] == RunStatus.FINISHED_COMPLETED.value, meta
    result = Path(sess.download_job_result(job_id, destination=str(tmp_path)))
    found = sorted(result.rglob("inventory.json"))
    assert found, f"no inventory.json in {result}"
    inventory = json.loads(found[0].read_text())
    summaries = inventory["sites"]
    assert [s["site"] for s in summaries] == list(SITES)
    assert inventory["failed_sites"] == {}
    phantoms = json.loads((federation["data"] / "federation.json").read_text())["sites"]
    for i, s in enumerate(summaries, start=1):
        assert s["n_cases"] == 2 and s["data_source"] == "site data root"
        assert s["modalities"] == phantoms[f"site-{i}"]["modalities"]
        assert "root" not in s  # the local path stays at the site
    # Each hospital's privacy scope (local/privacy.json) audited what left it: only the summary.
    for site in SITES:
        audit = prod / site / job_id / "payload_audit.jsonl"
        assert audit.is_file(), f"{site}: privacy filter did not run"
        records = [json.loads(line) for line in audit.read_text().splitlines()]
        out = [r for r in records if r["direction"] == "out"]
        assert out and all(set(r["items"]) == {"summary"} for r in out)


def test_modalitybank_direct_steps_across_processes(federation, tmp_path):
    """The tiny ModalityBank job across real processes and TLS: steps go out as aux messages
    (step_transport "direct", the job's default) and each site audits every one both ways."""
    sess, prod = federation["admin"], federation["prod"]
    job = tiny_modalitybank(tmp_path / "submit")
    server_args = json.loads(Path(job, "app", "config", "config_fed_server.json").read_text())["workflows"][0]["args"]
    assert server_args["server"]["step_transport"] == "direct"
    t0 = time.time()
    job_id = sess.submit_job(job)
    meta = sess.wait_for_job(job_id, timeout=MB_JOB_TIMEOUT, poll_interval=1.0)
    federation["mb_job_seconds"] = time.time() - t0
    assert meta["status"] == RunStatus.FINISHED_COMPLETED.value, f"{meta}\n{log_tails(federation, job_id)}"

    result = Path(sess.download_job_result(job_id, destination=str(tmp_path / "result")))
    found = sorted(result.rglob("modalitybank/summary.json"))
    assert found, f"no modalitybank/summary.json in {result}\n{log_tails(federation, job_id)}"
    summary = json.loads(found[0].read_text())
    assert summary["steps"] == {"pretrain": 2, "bank": 3}
    assert set(summary["sites"]) == set(SITES)

    # A site takes part in a phase's steps when it holds one of the modalities trained in it:
    # pretrain trains the source (T1), the bank the other modalities some site holds.
    phantoms = json.loads((federation["data"] / "federation.json").read_text())["sites"]
    held_anywhere = {m for s in phantoms.values() for m in s["modalities"]}
    source = server_args["generator"]["source_modality"]
    phase_modalities = {"pretrain": {source}, "bank": held_anywhere - {source}}
    for i, site in enumerate(SITES, start=1):
        holds = set(phantoms[f"site-{i}"]["modalities"])
        steps = sum(n for phase, n in summary["steps"].items() if holds & phase_modalities[phase])
        assert steps == sum(summary["steps"].values())  # every site holds T1 and two other modalities
        audit = prod / site / job_id / "payload_audit.jsonl"
        assert audit.is_file(), f"{site}: privacy filter did not run\n{log_tails(federation, job_id)}"
        records = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
        step_in = [r for r in records if r["task"] == "mb_step" and r["direction"] == "in"]
        step_out = [r for r in records if r["task"] == "mb_step" and r["direction"] == "out"]
        # The audit filter sits in the site's privacy scope and in the job: one record per payload.
        assert audit_filters_per_direction(prod / site, "task_data_filters") == 2
        assert audit_filters_per_direction(prod / site, "task_result_filters") == 2
        assert (len(step_in), len(step_out)) == (steps, steps), (
            f"{site}: {len(step_in)} in / {len(step_out)} out mb_step records for {steps} steps in {audit}"
        )
        for task in ("mb_register", "mb_preview"):
            assert [r["direction"] for r in records if r["task"] == task] == ["in", "out"], (site, task)
        assert all(r["site"] == site for r in records)
        # What arrived were fakes of held modalities only; what left, gradients of those and losses.
        for incoming in step_in:
            fakes = {k[5:] for k in incoming["items"] if k.startswith("fake/")}
            assert fakes and fakes <= holds, (site, fakes)
        for outgoing in step_out:
            grads = {k[5:] for k in outgoing["items"] if k.startswith("grad/")}
            assert grads and grads <= holds and set(outgoing["items"]) - {f"grad/{m}" for m in grads} == {"losses"}


def test_roles_without_the_right_are_refused(federation, tmp_path):
    """authorization.json: a member only views, an org admin does not submit, a lead of another
    org cannot download someone else's job."""
    from nvflare.fuel.flare_api.api_spec import AuthorizationError

    prod = federation["prod"]
    for user in (MEMBER, ORG_ADMIN_1):
        sess = session(user, prod)
        try:
            assert connected_sites(sess)  # may view ...
            with pytest.raises(AuthorizationError):
                sess.submit_job(job_copy(tmp_path / user))  # ... but not submit
        finally:
            sess.close()
    job_id = federation.get("job_id")
    if job_id:
        sess = session(LEAD_2, prod)
        try:
            with pytest.raises(AuthorizationError):
                sess.download_job_result(job_id)
        finally:
            sess.close()


def test_lead_cannot_ship_code(federation, tmp_path):
    """A job with a custom/ folder is BYOC; every site's authorization.json refuses it."""
    byoc_job = Path(job_copy(tmp_path))
    (byoc_job / "app" / "custom").mkdir()
    (byoc_job / "app" / "custom" / "note.txt").write_text("shipped code is refused at the sites\n")
    sess = session(LEAD_2, federation["prod"])
    try:
        job_id = sess.submit_job(str(byoc_job))  # accepted by the server's submit_job right ...
        meta = sess.wait_for_job(job_id, timeout=JOB_TIMEOUT, poll_interval=1.0)
        assert meta["status"] != RunStatus.FINISHED_COMPLETED.value, meta  # ... but never deployed
    finally:
        sess.close()
    server_log = (federation["prod"] / "localhost" / "log.txt").read_text(errors="replace")
    assert "BYOC not permitted" in server_log


FOREIGN_PROJECT = """api_version: 3
name: fedmodal
participants:
  - {{name: localhost, type: server, org: elsewhere, fed_learn_port: {port}}}
  - {{name: hospital-9, type: client, org: elsewhere}}
builders:
  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
  - path: nvflare.lighter.impl.static_file.StaticFileBuilder
  - path: nvflare.lighter.impl.cert.CertBuilder
  - path: nvflare.lighter.impl.signature.SignatureBuilder
"""


def tls_probe(port: int, ca: Path, kit: Path) -> str:
    """Open a TLS connection presenting `kit`'s client certificate: "open" if the server keeps it."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    context.load_cert_chain(str(kit / "startup" / "client.crt"), str(kit / "startup" / "client.key"))
    with (
        socket.create_connection(("localhost", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        conn.settimeout(3)
        try:
            return f"closed {conn.recv(1)!r}"  # TLS 1.3: the server checks our certificate now
        except TimeoutError:
            return "open"
        except (ssl.SSLError, OSError) as error:
            return f"closed ({error})"


def test_client_from_another_provisioning_is_refused(federation):
    """Same project and site-style name, certificates from another root CA: never joins."""
    root, env, procs, prod, port = (federation[k] for k in ("root", "env", "procs", "prod", "port"))
    foreign = provision(FOREIGN_PROJECT.format(port=port), root / "foreign", env)
    intruder = foreign / "hospital-9"
    procs.start("intruder", intruder, env, federation["logs"] / "intruder.out")
    log = intruder / "log.txt"
    try:
        deadline = time.time() + 30
        while time.time() < deadline and "CERTIFICATE_VERIFY_FAILED" not in (
            log.read_text(errors="replace") if log.is_file() else ""
        ):
            time.sleep(0.5)
        assert "CERTIFICATE_VERIFY_FAILED" in log.read_text(errors="replace")  # it does not trust our server
        assert "Successfully registered" not in log.read_text(errors="replace")
        names = connected_sites(federation["admin"])
        assert "hospital-9" not in names and set(SITES) <= set(names)
    finally:
        procs.stop("intruder")
    # ... and our server does not trust it: it drops a connection presenting the foreign
    # certificate even when the caller trusts our root CA, and keeps one from hospital-1.
    ca = prod / "hospital-1" / "startup" / "rootCA.pem"
    assert tls_probe(port, ca, prod / "hospital-1") == "open"
    assert tls_probe(port, ca, intruder).startswith("closed")
