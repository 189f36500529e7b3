"""Command line: ``fedmodal phantoms``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedmodal.brats import RELEASES
from fedmodal.data.phantoms.cache import build_or_reuse, cache_root
from fedmodal.data.phantoms.grid import DEFAULT_SHAPE
from fedmodal.data.phantoms.presets import DEFAULT_PRESET, PRESETS
from fedmodal.data.phantoms.spec import DEFAULT_LAYOUT, federation_spec
from fedmodal.data.phantoms.writer import TEST_SITE, read_federation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fedmodal phantoms``."""
    presets = "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS), help=presets)
    parser.add_argument("--out", default=None, help="root folder (default: $FEDMODAL_PHANTOM_ROOT or the cache)")
    parser.add_argument("--seed", type=int, default=0, help="seed every case derives from (default 0)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        default=list(DEFAULT_SHAPE),
        help="grid over 240x240x155 mm (default 96 96 62, 2.5 mm; 240 240 155 is 1 mm)",
    )
    parser.add_argument(
        "--layout",
        default=DEFAULT_LAYOUT,
        choices=list(RELEASES),
        help="BraTS release naming and ET label (default brats2021)",
    )
    parser.add_argument("--cases-per-site", type=int, default=None, help="training cases per site (default: preset's)")
    parser.add_argument("--test-cases", type=int, default=None, help="held-out full-modal test cases (default: 10)")
    parser.add_argument(
        "--sites",
        type=int,
        default=None,
        help="hospitals: the preset's site-N repeated in turn (site-4 holds what site-1 holds; default: the preset's)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes generating cases (default 1; each extra one costs ~3 s to start)",
    )
    parser.add_argument("--force", action="store_true", help="replace whatever is at --out")


def run(args: argparse.Namespace) -> int:
    """Build (or reuse) a federation and say where it is, how long it took and its size."""
    spec = federation_spec(
        args.preset, args.seed, args.shape, args.layout, args.cases_per_site, args.test_cases, num_sites=args.sites
    )
    out = Path(args.out) if args.out else cache_root(spec)
    start = time.perf_counter()
    try:
        root, built = build_or_reuse(out, spec, overwrite=args.force, workers=args.workers)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    info = read_federation(root)
    size = info["build"]["bytes"]
    n_cases = sum(s["cases"] for s in info["sites"].values()) + (info["test"] or {}).get("cases", 0)
    verb = "built" if built else "reused (already complete)"
    print(f"{verb} {args.preset} phantom federation at {root}")
    print(
        f"  {seconds:.1f} s, {size / 1e6:.1f} MB, {n_cases} cases ({size / max(n_cases, 1) / 1e6:.2f} MB per case), "
        f"shape {info['shape']} at {info['spacing'][0]:g}x{info['spacing'][1]:g}x{info['spacing'][2]:g} mm, "
        f"layout {info['layout']} (ET={info['et_label']})"
    )
    for site, s in info["sites"].items():
        missing = f", missing {','.join(s['missing'])}" if s["missing"] else ""
        print(f"  {site:<8} {s['cases']:>3} cases  {','.join(s['modalities'])}{missing}")
    if info["test"]:
        print(f"  {TEST_SITE:<8} {info['test']['cases']:>3} cases  {','.join(info['test']['modalities'])} (held out)")
    return 0
