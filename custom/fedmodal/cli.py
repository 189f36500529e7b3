"""The `fedmodal` console script.

Each sub-command lives beside the code it drives; this table only names it, so that
`fedmodal --help` stays fast (nothing heavy is imported until a command runs).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, function adding arguments to a parser, function running parsed args, help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "job": ("fedmodal.jobs.cli", "add_arguments", "run", "list, export or run a fedmodal NVFlare job (sim, poc, prod)"),
    "reproduce": ("fedmodal.reproduce.cli", "add_arguments", "run", "reproduce a paper's table (resumable stages)"),
    "phantoms": ("fedmodal.data.phantoms", "add_arguments", "run", "build a phantom federation of BraTS-named NIfTI"),
    "montage": ("fedmodal.data.montage", "add_arguments", "run", "draw every modality and the seg of one case as PNG"),
    "site-check": ("fedmodal.data.sitecheck", "add_arguments", "run", "report what a site folder would contribute"),
    "pretrain-generator": (
        "fedmodal.modalitybank.central",
        "add_arguments",
        "run",
        "pretrain the ModalityBank generator on data the server holds (no federation)",
    ),
    "synthesize": (
        "fedmodal.modalitybank.synthesis",
        "add_synthesize_arguments",
        "run_synthesize",
        "write synthetic modalities for seg masks with a trained ModalityBank",
    ),
    "complete": (
        "fedmodal.modalitybank.synthesis",
        "add_complete_arguments",
        "run_complete",
        "write each case's missing modalities beside the real ones",
    ),
    "synthesis-quality": (
        "fedmodal.modalitybank.quality",
        "add_arguments",
        "run",
        "MAE/PSNR/SSIM of synthetic against real images on a test set",
    ),
    "evaluate": ("fedmodal.baselines.evaluate", "add_arguments", "run", "score a segmentation model on a test set"),
    "train-seg": ("fedmodal.baselines.local", "add_arguments", "run", "train a segmentation model without federation"),
    "predict": ("fedmodal.baselines.predict", "add_arguments", "run", "write a segmentation model's BraTS seg files"),
    "export-bundle": (
        "fedmodal.baselines.bundle",
        "add_arguments",
        "run",
        "export a segmentation model as a MONAI bundle",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmodal", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, _add, _run, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    # Parse only up to the command name, then let the command's module define the rest.
    known, rest = top.parse_known_args(argv)
    if known.command is None:
        top.print_help()
        return 2
    module_name, add_fn, run_fn, help_text = COMMANDS[known.command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"fedmodal {known.command}", description=help_text)
    getattr(module, add_fn)(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(
        level=logging.DEBUG if known.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result = getattr(module, run_fn)(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
