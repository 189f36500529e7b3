#!/usr/bin/env python3
"""Write fedmodal's site-local files into provisioned NVFlare kits (or a simulator workspace).

    nvflare provision -p provisioning/project.yml -w WORKSPACE
    python provisioning/customize_site.py WORKSPACE/fedmodal            # latest prod_NN
    python provisioning/customize_site.py --simulator SIM_WORKSPACE     # for `nvflare simulator -w`

Into each kit's `local/` folder, NVFlare's place for site-local settings (`startup/` is left as
provisioned):
- server and sites: `resources.json` = the provisioned `resources.json.default` with the prefix
  `fedmodal.` (and the few NVFlare classes fedmodal jobs use beyond NVFlare's default list) added
  to `class_allow_list`, so jobs name fedmodal classes without shipping code;
  `authorization.json` from `provisioning/local/` (nobody may ship code: "byoc" is refused);
- sites: `privacy.json` from `provisioning/local/` (scopes whose filters run on everything
  that enters or leaves the site);
- server: job and snapshot storage moved under `--server-storage` when given;
- server, with `--direct-links HOST:PORTS`: `comm_config.json`, so that each job's server process
  listens on a port in PORTS of HOST (mutual TLS, the kits' own certificates) and each hospital's
  job process connects to it directly, instead of every message of a step being relayed by
  the server's parent process (NVFlare's ad-hoc connections). The server's firewall must then let
  the hospitals reach HOST on PORTS as well as the federation port.
Needs only the standard library and NVFlare (no torch, no installed fedmodal), so it runs
wherever `nvflare provision` does: the allow-list itself is read from the repository's
`custom/fedmodal/fl/allow_list.py`, its one definition.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICY_DIR = HERE / "local"


def _load_allow_list():
    path = HERE.parent / "custom" / "fedmodal" / "fl" / "allow_list.py"
    spec = importlib.util.spec_from_file_location("fedmodal_allow_list", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_allow = _load_allow_list()
FEDMODAL_PREFIX, NVFLARE_EXTRAS = _allow.FEDMODAL_PREFIX, _allow.NVFLARE_EXTRAS
with_allow_list, write_json, customize_simulator = _allow.with_allow_list, _allow.write_json, _allow.customize_simulator


def latest_prod_dir(path: Path) -> Path:
    """`path` itself if it holds kits, else its newest `prod_NN` folder."""
    if any((p / "startup").is_dir() for p in path.iterdir() if p.is_dir()):
        return path
    prods = sorted((p for p in path.glob("prod_*") if p.is_dir()), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    if not prods:
        raise SystemExit(f"{path}: no kits and no prod_NN folder (run `nvflare provision` first)")
    return prods[-1]


def kit_kind(kit: Path) -> str | None:
    """The kit's kind by its startup config: 'server', 'client', or None (admin kits, other folders)."""
    startup = kit / "startup"
    for kind, marker in (("server", "fed_server.json"), ("client", "fed_client.json")):
        if (startup / marker).is_file():
            return kind
    return None


def set_server_storage(resources: dict, storage: Path) -> dict:
    """Point the job store and the snapshot store under `storage` (NVFlare defaults to /tmp/nvflare)."""
    storage = storage.expanduser().absolute()
    for component in resources.get("components", []):
        if component.get("id") == "job_manager":
            component.setdefault("args", {})["uri_root"] = str(storage / "jobs-storage")
    snapshot = resources.get("snapshot_persistor", {}).get("args", {}).get("storage", {}).get("args")
    if snapshot is not None:
        snapshot["root_dir"] = str(storage / "snapshot-storage")
    return resources


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def direct_link_settings(host: str, ports: str) -> dict:
    """The server's NVFlare communication settings (`local/comm_config.json`) for direct links.

    Only the server's job processes listen; a hospital's job process connects out to the
    address the server sends it (hospitals need no setting of their own). NVFlare keeps ad-hoc
    links in clear text unless their resources ask for a secure connection, hence
    `connection_security: mtls`: both ends present the certificates they were provisioned
    with, as on the federation port."""
    resources = {"host": host, "ports": ports, "connection_security": "mtls"}
    return {"allow_adhoc_conns": True, "adhoc": {"scheme": "tcp", "resources": resources}}


def parse_direct_links(value: str) -> tuple[str, str]:
    """ "fedmodal-server.example.org:8100-8199" -> (host, port range)."""
    host, sep, ports = value.rpartition(":")
    bounds = ports.split("-")
    if not sep or not host or not all(b.isdigit() for b in bounds) or len(bounds) > 2:
        raise SystemExit(
            f"--direct-links {value!r}: expected HOST:PORT or HOST:FIRST-LAST, the server's name as the "
            "hospitals reach it and the ports its job processes may listen on"
        )
    return host, ports


def write_comm_config(kit: Path, settings: dict) -> None:
    """Merge `settings` into the kit's `local/comm_config.json`, keeping what an operator put there."""
    path = kit / "local" / "comm_config.json"
    current = read_json(path) if path.is_file() else {}
    write_json(path, {**current, **settings})


def customize_kit(
    kit: Path,
    kind: str,
    prefixes: list[str],
    server_storage: Path | None,
    direct_links: tuple[str, str] | None = None,
) -> list[str]:
    """Write the site-local files of one server or client kit; returns the files written."""
    local = kit / "local"
    default = local / "resources.json.default"
    resources = read_json(default) if default.is_file() else {"format_version": 2}
    resources = with_allow_list(resources, prefixes)
    if kind == "server" and server_storage is not None:
        resources = set_server_storage(resources, server_storage)
    write_json(local / "resources.json", resources)
    written = ["resources.json"]
    shutil.copyfile(POLICY_DIR / "authorization.json", local / "authorization.json")
    written.append("authorization.json")
    if kind == "client":
        shutil.copyfile(POLICY_DIR / "privacy.json", local / "privacy.json")
        written.append("privacy.json")
    if kind == "server" and direct_links is not None:
        write_comm_config(kit, direct_link_settings(*direct_links))
        written.append("comm_config.json")
    return written


def customize_prod(
    prod: Path,
    prefixes: list[str],
    server_storage: Path | None = None,
    direct_links: tuple[str, str] | None = None,
) -> dict[str, list[str]]:
    """Customize every server and client kit under one provisioning output folder."""
    done = {}
    for kit in sorted(p for p in prod.iterdir() if p.is_dir()):
        kind = kit_kind(kit)
        if kind is not None:
            done[kit.name] = customize_kit(kit, kind, prefixes, server_storage, direct_links)
    if not done:
        raise SystemExit(f"{prod}: no server or client kit found")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="provisioning output (WORKSPACE/<project> or a prod_NN folder)")
    parser.add_argument("--simulator", action="store_true", help="PATH is an `nvflare simulator` workspace instead")
    parser.add_argument(
        "--allow", action="append", default=[], metavar="PREFIX", help="another class prefix to allow (repeatable)"
    )
    parser.add_argument("--server-storage", type=Path, help="absolute folder for the server's job and snapshot store")
    parser.add_argument(
        "--direct-links",
        metavar="HOST:PORTS",
        help="let job processes connect directly over mutual TLS: the server's name as hospitals reach it and "
        "the port range its job processes listen on (e.g. fedmodal-server.example.org:8100-8199)",
    )
    args = parser.parse_args(argv)
    direct_links = parse_direct_links(args.direct_links) if args.direct_links else None
    prefixes = [FEDMODAL_PREFIX, *NVFLARE_EXTRAS, *args.allow]
    if args.simulator:
        print(f"wrote {customize_simulator(args.path, prefixes)}")
        return 0
    prod = latest_prod_dir(args.path)
    for kit, files in customize_prod(prod, prefixes, args.server_storage, direct_links).items():
        print(f"{prod / kit}/local: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
