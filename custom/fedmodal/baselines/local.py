"""`fedmodal train-seg`: a segmentation baseline without federation.

One site (`--sites site-1`: the single-centre baseline) or several pooled (`--sites site-1
site-2 site-3`: centralised "Real-All", each case keeping its own site's modalities). Trains
the same network, loss and local recipe as the FedAvg job's sites, keeps the best (by mean
validation Dice) and last checkpoints, then scores the best one on each site's test split and
on the held-out test folder.

Outputs in `--out`: best.pt, last.pt, history.jsonl (one JSON record per validation),
tb/ (TensorBoard), evaluation/<test set>/results.{md,csv,json}, run.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from fedmodal.amp import PRECISIONS
from fedmodal.baselines.config import SegConfig, parse_regions

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data roots


def resolve_root(data_root: str | None, preset: str) -> Path:
    """`--data-root`, else `$FEDMODAL_DATA_ROOT`, else the phantom federation of `preset`."""
    from fedmodal.fl.site import DATA_ROOT_ENV

    value = data_root or os.environ.get(DATA_ROOT_ENV)
    if value:
        root = Path(value).expanduser()
        if not root.is_dir():
            raise SystemExit(f"data root {root} is not a folder")
        return root
    from fedmodal.data.phantoms import ensure_federation

    return ensure_federation(preset)


def _holds_cases(folder: Path) -> bool:
    from fedmodal.data.discovery import detect_release
    from fedmodal.data.errors import DataError

    try:
        detect_release(folder)
        return True
    except DataError:
        return False


def site_folders(root: Path, sites: list[str] | None, test_name: str = "test") -> dict[str, Path]:
    """Site name -> folder: the named `<root>/<site>` folders, else every site folder under the
    root (the held-out `test` folder excluded), else the root itself when it holds cases."""
    if sites:
        missing = [s for s in sites if not (root / s).is_dir()]
        if missing:
            found = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise SystemExit(f"no site folder {missing} under {root} (it has {found})")
        return {s: root / s for s in sites}
    subfolders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and p.name != test_name and _holds_cases(p)}
    if subfolders:
        return subfolders
    if _holds_cases(root):
        return {root.name: root}
    raise SystemExit(f"no BraTS site folder under {root}")


# ----------------------------------------------------------------------------- arguments


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Model and training settings shared by `train-seg` and the FedAvg benchmark."""
    group = parser.add_argument_group("model and training")
    group.add_argument(
        "--dims",
        type=int,
        default=2,
        choices=[2, 3],
        help="2: axial-slice U-Net (default); 3: patch U-Net with sliding-window inference",
    )
    group.add_argument("--regions", nargs="+", default=None, help="regions to predict (default 2D: WT; 3D: WT TC ET)")
    group.add_argument("--arch", default="unet", choices=["unet", "basicunet"], help="MONAI network (default unet)")
    group.add_argument("--channels", type=int, nargs="+", default=None, help="U-Net channels per level")
    group.add_argument("--num-res-units", type=int, default=-1, help="residual units per level (unet)")
    group.add_argument("--patch-size", type=int, nargs="+", default=None, help="training slice/patch size")
    group.add_argument(
        "--output-prior",
        type=float,
        default=0.0,
        help="initial foreground probability of each region's sigmoid (default 0: MONAI's initialisation)",
    )
    group.add_argument("--batch-size", type=int, default=0, help="slices or patches per step")
    group.add_argument("--samples-per-case", type=int, default=0, help="slices or patches per case per epoch")
    group.add_argument("--loss", default="dicece", choices=["dicece", "dicefocal"], help="default dicece")
    group.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    group.add_argument(
        "--modality-dropout",
        type=float,
        default=0.0,
        help="chance each available modality is dropped from a training sample (default 0)",
    )
    group.add_argument("--no-mask-channels", action="store_true", help="do not feed the availability mask channels")
    group.add_argument("--no-augment", action="store_true", help="no flips or intensity jitter")
    group.add_argument(
        "--precision",
        default=SegConfig.precision,
        choices=PRECISIONS,
        help="auto: bf16 (else fp16 with a gradient scaler) on CUDA, fp32 on CPU; bf16 is faster on recent CPUs",
    )
    group.add_argument(
        "--include-synthetic",
        action="store_true",
        help="fill missing modalities from <case>_<mod>_synthetic.nii.gz files (completed sites)",
    )


def config_from_args(args: argparse.Namespace) -> SegConfig:
    return SegConfig(
        spatial_dims=args.dims,
        regions=parse_regions(args.regions),
        arch=args.arch,
        channels=tuple(args.channels or ()),
        num_res_units=args.num_res_units,
        patch_size=tuple(args.patch_size or ()),
        output_prior=args.output_prior,
        batch_size=args.batch_size,
        samples_per_case=args.samples_per_case,
        loss=args.loss,
        lr=args.lr,
        modality_dropout=args.modality_dropout,
        mask_channels=not args.no_mask_channels,
        augment=not args.no_augment,
        precision=args.precision,
        include_synthetic=args.include_synthetic,
        cache=not getattr(args, "no_cache", False),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fedmodal train-seg`."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data-root",
        default=None,
        help="federation folder with one sub-folder per site, or one site's BraTS folder "
        "(default: $FEDMODAL_DATA_ROOT, else the phantom federation)",
    )
    group.add_argument("--preset", default="modalitybank-missing", help="phantom preset when no data root is set")
    group.add_argument(
        "--sites",
        nargs="+",
        default=None,
        help="site folders to train on; several are pooled (centralised). Default: every site",
    )
    group.add_argument(
        "--test", default=None, help="held-out test folder (default <data root>/test when it exists; 'none' to skip)"
    )
    add_config_arguments(parser)
    group = parser.add_argument_group("run")
    group.add_argument("--epochs", type=int, default=100, help="passes over the training cases (default 100)")
    group.add_argument("--val-every", type=int, default=5, help="epochs between validations (default 5)")
    group.add_argument("--seed", type=int, default=0, help="run seed; the data seed also depends on the sites")
    group.add_argument("--out", default=None, help="output folder (default runs/train-seg/<sites>)")
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0 ...")
    group.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    group.add_argument("--no-cache", action="store_true", help="re-read cases every epoch instead of caching them")


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> int:
    from fedmodal.baselines.data import load_site, load_volumes, pool_sites, train_loader
    from fedmodal.baselines.evaluate import score_models, write_results
    from fedmodal.baselines.trainer import SegTrainer, flat_metrics, save_checkpoint
    from fedmodal.fl.site import select_device, site_seed

    cfg = config_from_args(args)
    device = select_device(args.device, args.num_threads)
    root = resolve_root(args.data_root, args.preset)
    folders = site_folders(root, args.sites)
    sites = [load_site(folder, site=name, include_synthetic=cfg.include_synthetic) for name, folder in folders.items()]
    data = pool_sites(sites)
    name = data.name
    out = Path(args.out or Path("runs") / "train-seg" / name.replace("+", "_"))
    out.mkdir(parents=True, exist_ok=True)
    seed = site_seed(args.seed, name)
    logger.info("training on %s (%s), modalities %s, out %s", name, data.summary()["cases"], data.modalities, out)

    loader = train_loader(data.cases("train"), cfg, seed, device)
    if not data.cases("val"):
        logger.warning("%s has no validation case: validating on 2 training cases", name)
    val_volumes = load_volumes(data.validation_cases())
    trainer = SegTrainer(cfg, device=device, seed=seed)
    meta = {
        "trained_modalities": list(data.modalities),
        "sites": [s.name for s in sites],
        "mode": "centralised" if len(sites) > 1 else "local",
    }
    (out / "run.json").write_text(
        json.dumps(
            {
                "config": cfg.to_dict(),
                "net": trainer.net.config(),
                "data": data.summary(),
                "root": str(root),
                "seed": args.seed,
                **meta,
            },
            indent=2,
        )
    )

    writer = _summary_writer(out / "tb")
    best, start = -math.inf, time.time()
    with open(out / "history.jsonl", "a") as history:
        try:
            for epoch in range(1, args.epochs + 1):
                stats = trainer.train_epochs(loader, 1)
                if writer:
                    writer.add_scalar("train/loss", stats["loss"], epoch)
                if epoch % args.val_every and epoch != args.epochs:
                    continue
                metrics = flat_metrics(trainer.score(val_volumes), prefix="val_")
                elapsed = time.time() - start
                record = {
                    "site": name,
                    "epoch": epoch,
                    "loss": round(stats["loss"], 5),
                    **{k: round(v, 5) for k, v in metrics.items()},
                    "elapsed_s": round(elapsed, 1),
                    "eta_s": round(elapsed / epoch * (args.epochs - epoch), 1),
                }
                history.write(json.dumps(record) + "\n")
                history.flush()
                print(json.dumps(record), flush=True)
                if writer:
                    for key, value in metrics.items():
                        writer.add_scalar(f"val/{key[4:]}", value, epoch)
                if metrics["val_dice"] > best:
                    best = metrics["val_dice"]
                    save_checkpoint(out / "best.pt", trainer, {**meta, "epoch": epoch, "val_dice": best})
            save_checkpoint(out / "last.pt", trainer, {**meta, "epoch": args.epochs, "val_dice": metrics["val_dice"]})
        finally:
            if writer:
                writer.close()
    train_seconds = time.time() - start
    logger.info("trained %d epochs in %.0fs; best validation Dice %.4f", args.epochs, train_seconds, best)

    # Score the best model: each site's own test split (its own modalities), then the held-out set.
    models = {f"{name} (best)": out / "best.pt"}
    results: dict[str, Any] = {"train_seconds": round(train_seconds, 1), "best_val_dice": best}
    for site in sites:
        test_cases = site.cases("test")
        if not test_cases:
            continue
        rows = score_models(models, load_volumes(test_cases), modalities=site.modalities, device=str(device))
        write_results(
            rows,
            out / "evaluation" / f"{site.name}-test",
            f"{name} on {site.name}'s test split",
            {"cases": len(test_cases), "modalities": ", ".join(site.modalities)},
        )
        results[f"{site.name}-test"] = flat_metrics(next(iter(rows.values()))["cases"])
    test_root = None if (args.test or "").lower() == "none" else Path(args.test) if args.test else root / "test"
    if test_root is not None and test_root.is_dir():
        held = load_site(test_root, include_synthetic=cfg.include_synthetic)
        rows = score_models(models, load_volumes(held.cases("all")), device=str(device), with_empty=True)
        paths = write_results(
            rows,
            out / "evaluation" / "heldout",
            f"{name} on the held-out test set",
            {"data": str(test_root), "cases": len(held.cases("all")), "model inputs": ", ".join(data.modalities)},
        )
        results["heldout"] = flat_metrics(rows[f"{name} (best)"]["cases"])
        print(paths["md"].read_text())
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        json.dumps(
            {
                "site": name,
                "event": "done",
                "out": str(out),
                **{k: v for k, v in results.items() if not isinstance(v, dict)},
            }
        )
    )
    return 0


def _summary_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency, but a run should not die without it
        logger.warning("tensorboard is not installed: no TensorBoard logs")
        return None
    return SummaryWriter(str(folder))
