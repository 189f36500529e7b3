"""What a fedmodal job is: named sections of settings, and a function that builds the FedJob.

A job's settings come in sections, one settings dataclass each (e.g. ModalityBank's
"generator", "server", "site", "adversary"). `JobSpec.recipe(overrides)` builds NVFlare's
`FedJob` from them and wraps it in a `Recipe`, which NVFlare's `SimEnv`, `PocEnv` and `ProdEnv`
run and `export` writes as the classic job folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmodal.config import Settings, parse_value

# NVFlare's `export` keeps the installed package's code out of the job's custom/ folder: sites
# run fedmodal from their installed package, admitted by their class allow-list.
APP_PACKAGES = ["fedmodal"]


@dataclass
class ResourceConfig(Settings):
    """What each site needs, as NVFlare 2.9's portable `resource_spec` fields of meta.json
    (`@default`, read by every site's resource manager before it accepts the job).

    The defaults fit the CPU default of every job; a GPU federation sets `site_gpus=1` (and
    the site's resource manager lists its GPUs, see provisioning/README.md). NVFlare drops a
    0-GPU request before the resource manager sees it, so CPU-only sites schedule it.

    Args:
        site_gpus: GPUs per site (`num_of_gpus`).
        site_cpus: CPU cores per site (`num_of_cpus`).
        site_memory: memory per site (`memory`, e.g. "4Gi").
    """

    settings_name = "resource"

    site_gpus: int = 0
    site_cpus: int = 1
    site_memory: str = "4Gi"

    def resource_spec(self) -> dict[str, dict]:
        return {"@default": {"num_of_gpus": self.site_gpus, "num_of_cpus": self.site_cpus, "memory": self.site_memory}}


@dataclass
class TrackingConfig(Settings):
    """Experiment tracking of the metrics a job's sites stream to the server (NVFlare's analytics
    events), beside the TensorBoard logs every job writes.

    Args:
        mlflow: also send them to MLflow (NVFlare's `MLflowReceiver` on the server; needs the
            `mlflow` extra there: `pip install "fedmodal[mlflow]"`). Off by default.
        tracking_uri: where MLflow keeps them, required with `mlflow`: an MLflow server
            ("http://host:5000"), a database ("sqlite:////path/mlflow.db", needs the full
            `mlflow` package) or a local file store ("file:///path/mlruns", which MLflow 3 opens
            only with MLFLOW_ALLOW_FILE_STORE=true in the server's environment).
        experiment: the MLflow experiment; each site becomes one run of it.
    """

    settings_name = "tracking"

    mlflow: bool = False
    tracking_uri: str = ""
    experiment: str = "fedmodal"

    def __post_init__(self):
        if self.mlflow and not self.tracking_uri:
            raise ValueError(
                "tracking.mlflow needs tracking.tracking_uri: an MLflow server (http://host:5000), "
                "sqlite:////path/mlflow.db (full mlflow package) or file:///path/mlruns"
            )


@dataclass
class JobSpec:
    """One job: its name, its settings sections, and how to build it.

    Args:
        name: the job's name (its folder under jobs/, and NVFlare's job name).
        description: one line for `fedmodal job list`.
        sections: section name -> settings dataclass.
        build: (job name, resolved settings by section) -> FedJob.
        defaults: section -> values this job uses instead of the dataclass defaults (e.g. the
            AsynDGAN job's generator mode); command-line overrides still win.
        min_clients: sites the job needs (meta.json's min_clients).
        profiles: named sets of section values picked as a whole (`--profile paper`: the
            paper's network and image sizes, for GPU sites); `--set` values still win.
        metrics_event: the server-side NVFlare event carrying the metrics the sites stream
            (empty: the sites stream none, and the job has no "tracking" section).
    """

    name: str
    description: str
    sections: dict[str, type[Settings]]
    build: Callable[[str, dict[str, Settings], int], Any]
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    min_clients: int = 2
    profiles: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    metrics_event: str = ""

    @property
    def all_sections(self) -> dict[str, type[Settings]]:
        """The job's own sections, "resources" (every job declares what a site needs) and, where
        the sites stream metrics, "tracking"."""
        tracking = {"tracking": TrackingConfig} if self.metrics_event else {}
        return {**self.sections, "resources": ResourceConfig, **tracking}

    def settings(self, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Settings]:
        """Every section's settings: dataclass defaults, then this job's, then `overrides`."""
        overrides = dict(overrides or {})
        sections = self.all_sections
        unknown = sorted(set(overrides) - set(sections))
        if unknown:
            raise ValueError(f"job {self.name} has no settings section {unknown}; sections: {sorted(sections)}")
        return {
            section: cls.from_dict(
                {**self.defaults.get(section, {}), **overrides.get(section, {})},
                where=f"job {self.name}, section {section}",
            )
            for section, cls in sections.items()
        }

    def job(self, overrides: Mapping[str, Mapping[str, Any]] | None = None):
        """NVFlare's `FedJob` for these settings, its meta.json declaring what each site needs."""
        settings = self.settings(overrides)
        job = self.build(self.name, settings, self.min_clients)
        job.set_app_packages(APP_PACKAGES)
        for site, spec in settings["resources"].resource_spec().items():
            job.job.add_resource_spec(site, spec)
        if self.metrics_event and settings["tracking"].mlflow:
            add_mlflow_receiver(job, settings["tracking"], self.metrics_event)
        return job

    def recipe(self, overrides: Mapping[str, Mapping[str, Any]] | None = None):
        """An NVFlare `Recipe` of the job, for `SimEnv` / `PocEnv` / `ProdEnv` and `export`."""
        from nvflare.recipe.spec import Recipe

        class FedmodalRecipe(Recipe):
            """A recipe around a job fedmodal builds itself (NVFlare's recipes are per workflow)."""

        return FedmodalRecipe(self.job(overrides))


def add_mlflow_receiver(job, tracking: TrackingConfig, event: str) -> None:
    """NVFlare's MLflow receiver on the server, for the sites' streamed metrics."""
    try:
        from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver
    except ImportError as error:
        raise ValueError(
            f"tracking.mlflow is on but MLflow cannot be imported ({error}); install it with "
            '`pip install "fedmodal[mlflow]"` here and on the server'
        ) from None
    receiver = MLflowReceiver(
        tracking_uri=tracking.tracking_uri,
        # NVFlare names each site's run "<site>-<job id>-<job name>-<run_name>".
        kw_args={"experiment_name": tracking.experiment, "run_name": "metrics"},
        events=[event],
    )
    job.to_server(receiver, id="mlflow_receiver")


def route_settings(spec: JobSpec, values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{"generator.image_size": 96, "ndf": 64} -> {"generator": {"image_size": 96}, "adversary": {"ndf": 64}}.

    A bare key must belong to exactly one section; "section.key" picks the section.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, dot, name = key.rpartition(".")
        if dot:
            if section not in spec.all_sections:
                raise ValueError(
                    f"{key!r}: job {spec.name} has no section {section!r}; sections: {sorted(spec.all_sections)}"
                )
            if name not in spec.all_sections[section].field_names():
                raise ValueError(f"{key!r}: section {section!r} of job {spec.name} has no setting {name!r}")
        else:
            owners = [s for s, cls in spec.all_sections.items() if name in cls.field_names()]
            if len(owners) != 1:
                where = (
                    f"is in sections {owners}: write SECTION.{name}" if owners else f"is no setting of job {spec.name}"
                )
                raise ValueError(f"{key!r} {where}")
            section = owners[0]
        out.setdefault(section, {})[name] = value
    return out


def parse_overrides(spec: JobSpec, assignments: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`["generator.image_size=96", "ndf=64"]` (the command line's `--set`) as `route_settings` does.

    Values are read as JSON where they parse (numbers, true/false, lists), else taken as text.
    """
    values = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE or SECTION.KEY=VALUE")
        values[key] = parse_value(text)
    return route_settings(spec, values)


def with_profile(
    spec: JobSpec, profile: str | None, overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """The section values of the job's named `profile`, with `overrides` on top."""
    merged: dict[str, dict[str, Any]] = {}
    if profile:
        if profile not in spec.profiles:
            raise ValueError(
                f"job {spec.name} has no profile {profile!r}; its profiles: {sorted(spec.profiles) or 'none'}"
            )
        merged = {section: dict(values) for section, values in spec.profiles[profile].items()}
    for section, values in (overrides or {}).items():
        merged.setdefault(section, {}).update(values)
    return merged


def export_job(spec: JobSpec, job_root: str | Path, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write the job's classic folder (meta.json, app/config/*.json) to `<job_root>/<name>`."""
    spec.recipe(overrides).export(str(job_root))
    return Path(job_root) / spec.name


def add_payload_audit(job, tasks: Sequence[str]) -> None:
    """The payload audit on everything that enters or leaves a site for `tasks` (a deployed site
    also audits through its privacy scope; the filter records each payload once).

    One filter entry per task: NVFlare keeps a filter's tasks as a set, whose order would make
    the exported config differ from run to run.
    """
    from nvflare.job_config.defs import FilterType

    from fedmodal.fl.audit import PayloadAuditFilter

    for task in tasks:
        job.to_clients(PayloadAuditFilter(direction="in"), filter_type=FilterType.TASK_DATA, tasks=[task])
    for task in tasks:
        job.to_clients(PayloadAuditFilter(direction="out"), filter_type=FilterType.TASK_RESULT, tasks=[task])
