"""``fedmodal site-check DIR``: what a site's data folder would contribute, before it joins.

Prints the release, case count, modalities held, label convention, institutions and every
problem found (or the summary as JSON with ``--json``). Exit status 1 when the stop policy
hits a bad case or no case is usable, else 0. Reads files only; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from fedmodal.brats import MODALITIES
from fedmodal.data.errors import DataError
from fedmodal.data.manifest import ON_ERROR, build_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fedmodal site-check``."""
    parser.add_argument("root", metavar="DIR", help="the site's BraTS data folder (any release layout)")
    parser.add_argument(
        "--site", default=None, help="site name (default: fedmodal_site.json's, else the folder's name)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default=None,
        help="skip bad cases and report them (default), or stop at the first",
    )
    parser.add_argument("--no-seg", action="store_true", help="cases need no segmentation (e.g. synthesis-only sites)")
    parser.add_argument(
        "--exclude", nargs="*", default=(), metavar="MODALITY", help="modalities held but not to be used"
    )
    parser.add_argument(
        "--write-manifest", default=None, metavar="PATH", help="also write the manifest JSON (atomically)"
    )


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable report of ``SiteManifest.summary()``."""
    counts = summary["modality_counts"]
    lines = [
        f"site           {summary['site']}",
        f"folder         {summary['root']}",
        f"release        {summary['release']}",
        f"labels         {summary['label_convention']}",
        f"usable cases   {summary['n_cases']} ({summary['n_with_seg']} with segmentation)",
        "modalities     "
        + (", ".join(summary["modalities"]) or "none held by every case")
        + (f"  (declared not used: {', '.join(summary['excluded'])})" if summary["excluded"] else ""),
        "  per modality " + ", ".join(f"{m} {counts[m]}" for m in MODALITIES),
        "institutions   " + ", ".join(f"{name} ({n})" for name, n in summary["institutions"].items()),
        "split          " + ", ".join(f"{name} {n}" for name, n in summary["split"].items()),
        f"problems       {summary['n_problems']}",
    ]
    lines += [f"  - {_describe(p)}" for p in summary["problems"]]
    if summary["notes"]:
        lines.append(f"notes          {len(summary['notes'])}")
        lines += [f"  - {note}" for note in summary["notes"]]
    return "\n".join(lines)


def _describe(record: dict[str, Any]) -> str:
    return str(DataError(record.get("site"), record.get("case"), record.get("file"), record.get("problem", "")))


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the check; return the exit status."""
    out = out or sys.stdout
    try:
        manifest = build_manifest(
            args.root,
            site=args.site,
            exclude_modalities=tuple(args.exclude or ()),
            on_error=args.on_error,
            need_seg=not args.no_seg,
        )
    except DataError as error:
        if args.json:
            print(json.dumps({"error": error.to_record()}, indent=2), file=out)
        else:
            print(f"site-check failed: {error}", file=sys.stderr if out is sys.stdout else out)
        return 1
    summary = manifest.summary()
    if args.write_manifest:
        manifest.to_json(args.write_manifest)
    if args.json:
        print(json.dumps(summary, indent=2), file=out)
    else:
        print(format_summary(summary), file=out)
    if not manifest.cases:
        if not args.json:
            print("no usable case: this site cannot contribute", file=out)
        return 1
    return 0
