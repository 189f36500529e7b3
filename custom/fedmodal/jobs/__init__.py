"""Every fedmodal job, defined once with NVFlare's Job API from the settings dataclasses.

`JOBS` maps a job's name to its definition (`fedmodal.jobs.spec.JobSpec`). The committed
`jobs/<name>/` folders are `export_job(name, "jobs")`, kept byte-for-byte in sync by a test, so
`nvflare simulator jobs/<name>`, `nvflare job submit -j jobs/<name>` and `fedmodal job run NAME
--env sim|poc|prod` all run the same job.
"""

from __future__ import annotations

from fedmodal.jobs.fedavg import FEDAVG
from fedmodal.jobs.fedmepd import FEDMEPD
from fedmodal.jobs.inventory import SITE_INVENTORY
from fedmodal.jobs.mixmfl import MIXMFL
from fedmodal.jobs.modalitybank import MODALITYBANK, MODALITYBANK_ASYNDGAN
from fedmodal.jobs.spec import JobSpec, export_job, parse_overrides

JOBS: dict[str, JobSpec] = {
    spec.name: spec for spec in (MODALITYBANK, MODALITYBANK_ASYNDGAN, FEDAVG, FEDMEPD, MIXMFL, SITE_INVENTORY)
}


def job_settings(name: str, **values) -> dict:
    """A job's settings by section, with `values` changed (keys as `--set` takes them)."""
    from fedmodal.jobs.spec import route_settings

    spec = JOBS[name]
    return spec.settings(route_settings(spec, values))


__all__ = ["JOBS", "JobSpec", "export_job", "job_settings", "parse_overrides"]
