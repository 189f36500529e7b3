"""`fedmodal job list | export | run`: fedmodal's jobs through NVFlare's recipe environments.

fedmodal job list
fedmodal job export modalitybank jobs/                 # the classic folder, as committed
fedmodal job run modalitybank --env sim                # NVFlare's SimEnv, one thread per site
fedmodal job run fedavg --env sim --set num_rounds=2 --set seg.lr=0.0005
fedmodal job run modalitybank --env poc                # NVFlare's PocEnv (fresh local POC)
fedmodal job run modalitybank --env prod --startup-kit /path/to/admin@hospital.org
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

ENVS = ("sim", "poc", "prod")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", help="every job and its settings sections")
    export = sub.add_parser("export", help="write a job's classic folder (meta.json, app/config/*.json)")
    export.add_argument("name", help="job name, or 'all'")
    export.add_argument("out", type=Path, help="folder to write <name>/ into (e.g. jobs/)")
    _add_set(export)
    run = sub.add_parser("run", help="run a job in NVFlare's simulator, a local POC or a production federation")
    run.add_argument("name", help="job name (fedmodal job list)")
    run.add_argument("--env", choices=ENVS, default="sim", help="sim (default), poc or prod")
    run.add_argument("-n", "--sites", type=int, default=3, help="sim/poc: number of sites, named site-1.. (default 3)")
    run.add_argument(
        "--workspace",
        type=Path,
        default=Path("simulator_workspace"),
        help="sim: workspace root; the run goes to <workspace>/<job name> (default ./simulator_workspace)",
    )
    run.add_argument("--startup-kit", type=Path, help="prod: the admin's startup kit folder")
    run.add_argument(
        "--username", default="admin@nvidia.com", help="poc/prod: admin user (default POC's admin@nvidia.com)"
    )
    _add_set(run)


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        default=None,
        help="a named set of settings the job defines, e.g. 'paper' (the paper's sizes, for GPU sites; "
        "`fedmodal job list` names each job's profiles); --set values still win",
    )
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one setting: KEY or SECTION.KEY (repeatable; values are JSON where they parse)",
    )


def _spec(name: str):
    from fedmodal.jobs import JOBS

    if name not in JOBS:
        raise SystemExit(f"no job {name!r}; jobs: {', '.join(sorted(JOBS))}")
    return JOBS[name]


def _environment(args: argparse.Namespace, job_name: str):
    if args.env == "sim":
        from nvflare.recipe.sim_env import SimEnv

        from fedmodal.fl.allow_list import customize_simulator

        workspace_root = args.workspace.expanduser().absolute()
        # SimEnv keeps a workspace's own local/resources.json: give it the allow-list first.
        customize_simulator(workspace_root / job_name)
        return SimEnv(num_clients=args.sites, num_threads=args.sites, workspace_root=str(workspace_root))
    if args.env == "poc":
        from fedmodal.jobs.poc import FedmodalPocEnv

        return FedmodalPocEnv(num_clients=args.sites, username=args.username)
    from nvflare.recipe.prod_env import ProdEnv

    if args.startup_kit is None:
        raise SystemExit("--env prod needs --startup-kit (the admin's startup kit folder)")
    return ProdEnv(startup_kit_location=str(args.startup_kit.expanduser()), username=args.username)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ValueError as error:  # a bad --set or --profile: say which, no traceback
        raise SystemExit(f"fedmodal job {args.action}: {error}") from None


def _run(args: argparse.Namespace) -> int:
    from fedmodal.jobs import JOBS
    from fedmodal.jobs.spec import export_job, parse_overrides, with_profile

    if args.action == "list":
        for name, spec in sorted(JOBS.items()):
            sections = ", ".join(f"{s} ({cls.__name__})" for s, cls in spec.all_sections.items())
            profiles = ", ".join(sorted(spec.profiles)) or "none"
            print(f"{name}: {spec.description}\n    settings: {sections}\n    profiles: {profiles}")
        return 0
    if args.action == "export":
        names = sorted(JOBS) if args.name == "all" else [args.name]
        for name in names:
            spec = _spec(name)
            overrides = with_profile(spec, args.profile, parse_overrides(spec, args.assignments))
            print(f"wrote {export_job(spec, args.out, overrides)}")
        return 0
    spec = _spec(args.name)
    recipe = spec.recipe(with_profile(spec, args.profile, parse_overrides(spec, args.assignments)))
    env = _environment(args, spec.name)
    if args.env == "sim" and not os.environ.get("FEDMODAL_DATA_ROOT"):
        print("FEDMODAL_DATA_ROOT is not set: the sites use the phantom federation")
    result = recipe.run(env)
    status = result.get_status()
    workspace = result.get_result()
    print(
        json.dumps(
            {"job": spec.name, "env": args.env, "job_id": result.get_job_id(), "status": status, "result": workspace}
        )
    )
    return 0
