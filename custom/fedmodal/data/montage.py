"""Draw one BraTS case as a PNG: every modality side by side, then the segmentation.

The axial slice defaults to the one with the most tumour. A modality the case lacks gets an
"n/a" panel, so montages of different sites line up column by column; one that `fedmodal
complete` filled (`<case>_<modality>_synthetic.nii.gz`) is drawn, titled "(synthetic)" in
orange with an orange frame, so it is never mistaken for a real scan.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedmodal.brats import ET_LABEL, MODALITIES, MODALITY_TITLES
from fedmodal.data.cases import read_case
from fedmodal.data.discovery import read_case_folder
from fedmodal.data.layouts import release_of_folder, with_synthetic

SYNTHETIC_COLOUR = (1.0, 0.55, 0.0)

# BraTS's usual colours: necrosis red, oedema green, enhancing yellow (resection cavity blue).
LABEL_COLOURS = {
    "necrosis": (0.9, 0.1, 0.1),
    "oedema": (0.1, 0.8, 0.2),
    "enhancing": (1.0, 0.9, 0.0),
    "cavity": (0.2, 0.4, 1.0),
}


def _label_names(release: str | None, values: set[int]) -> dict[int, str]:
    """On-disk label value -> region: ET is 4 in BraTS 2018-2021 and 3 from 2023 (4 = cavity).

    The release (from the case folder's name) decides; for a folder named like no release,
    the labels present do (3 present: the 2023 convention).
    """
    et = ET_LABEL[release] if release else (3 if 3 in values else 4)
    names = {1: "necrosis", 2: "oedema", et: "enhancing"}
    if et == 3:
        names[4] = "cavity"
    return names


def _window(image: np.ndarray) -> tuple[float, float]:
    inside = image[image > 0]
    if inside.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(inside, [0.5, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def montage(case_dir, out_png, slice_index: int | None = None, dpi: int = 110) -> Path:
    """Write a PNG of every modality of a case and its seg: n/a panels for missing modalities,
    marked panels for synthetic ones.

    Args:
        case_dir: a BraTS case folder (any release's naming).
        out_png: output file.
        slice_index: axial slice (along the superior axis after reorientation to RAS);
            default: the slice with the most tumour, else the middle one.
        dpi: resolution of the PNG.

    Returns:
        the path written.
    """
    # A bare Figure renders without pyplot, so the caller's matplotlib backend is left alone.
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    case_dir = Path(case_dir)
    release = release_of_folder(case_dir.name)  # None: a folder not named like a BraTS case
    real = read_case_folder(case_dir, release or "unknown")
    synthetic = {m for m in real.synthetic if m not in real.images}
    case = with_synthetic(real)
    images, seg_path = case.images, case.seg
    if not images and seg_path is None:
        raise FileNotFoundError(f"no BraTS NIfTI files (*_t1/_t1ce/_t2/_flair/_seg.nii[.gz]) in {case_dir}")
    read = read_case(case)
    volumes, zooms = read.images, read.zooms
    seg = read.seg.astype(np.int16) if read.seg is not None else None
    shape = (seg if seg is not None else next(iter(volumes.values()))).shape
    if slice_index is None:
        if seg is not None and (seg > 0).any():
            slice_index = int(np.argmax((seg > 0).sum(axis=(0, 1))))
        else:
            slice_index = shape[2] // 2
    if not 0 <= slice_index < shape[2]:
        raise ValueError(f"slice {slice_index} is outside 0..{shape[2] - 1}")

    # Crop every panel to the brain's bounding box in the axial plane.
    occupied = np.zeros(shape[:2], dtype=bool)
    for volume in list(volumes.values()) + ([seg] if seg is not None else []):
        occupied |= (volume != 0).any(axis=2)
    if occupied.any():
        inside = np.argwhere(occupied)
        (x0, y0), (x1, y1) = inside.min(0), inside.max(0) + 1
        pad = max(2, (x1 - x0) // 20)
        box = (slice(max(x0 - pad, 0), x1 + pad), slice(max(y0 - pad, 0), y1 + pad))
    else:
        box = (slice(None), slice(None))
    volumes = {m: v[box] for m, v in volumes.items()}
    seg = seg[box] if seg is not None else None
    plane_shape = occupied[box].shape

    aspect = float(zooms[1]) / float(zooms[0])  # rows run along y, columns along x
    n_panels = len(MODALITIES) + 1
    fig = Figure(figsize=(2.6 * n_panels, 2.6 * plane_shape[1] / plane_shape[0] * aspect + 0.7))
    axes = fig.subplots(1, n_panels)
    fig.patch.set_facecolor("black")

    def display(plane: np.ndarray) -> np.ndarray:
        # plane is (x, y) in RAS. Rows become y (anterior at the top), columns -x: the patient's
        # right on the viewer's left, the radiological convention.
        return np.swapaxes(plane[::-1], 0, 1)

    def show(ax, plane, title, colour="white", **kw):
        ax.imshow(display(plane), origin="lower", aspect=aspect, interpolation="antialiased", **kw)
        ax.set_title(title, color=colour, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_facecolor("black")

    for ax, m in zip(axes, MODALITIES):
        if m in synthetic:
            lo, hi = _window(volumes[m])
            plane = volumes[m][:, :, slice_index]
            show(ax, plane, f"{MODALITY_TITLES[m]} (synthetic)", SYNTHETIC_COLOUR, cmap="gray", vmin=lo, vmax=hi)
            for spine in ax.spines.values():
                spine.set_edgecolor(SYNTHETIC_COLOUR)
                spine.set_linewidth(3)
        elif m in volumes:
            lo, hi = _window(volumes[m])
            show(ax, volumes[m][:, :, slice_index], MODALITY_TITLES[m], cmap="gray", vmin=lo, vmax=hi)
        else:
            show(ax, np.zeros(plane_shape), f"{MODALITY_TITLES[m]} (missing)", cmap="gray", vmin=0, vmax=1)
            ax.text(0.5, 0.5, "n/a", color="0.6", fontsize=22, ha="center", va="center", transform=ax.transAxes)
    axes[0].text(0.02, 0.98, "R", color="0.8", fontsize=8, ha="left", va="top", transform=axes[0].transAxes)
    axes[0].text(0.98, 0.98, "L", color="0.8", fontsize=8, ha="right", va="top", transform=axes[0].transAxes)

    ax = axes[-1]
    # The seg is drawn over a real scan: a synthetic one only when the case has no real one.
    order = [m for m in ("t1ce", "t1", "flair", "t2") if m in volumes]
    background = next((volumes[m] for m in sorted(order, key=lambda m: m in synthetic)), None)
    if background is not None:
        lo, hi = _window(background)
        show(ax, background[:, :, slice_index], "seg", cmap="gray", vmin=lo, vmax=hi)
    else:
        show(ax, np.zeros(plane_shape), "seg", cmap="gray", vmin=0, vmax=1)
    handles = []
    if seg is not None:
        plane = seg[:, :, slice_index]
        present = set(np.unique(seg).tolist())
        overlay = np.zeros(plane.shape + (4,))
        for value, name in _label_names(release, present).items():
            hit = plane == value
            overlay[hit, :3] = LABEL_COLOURS[name]
            overlay[hit, 3] = 0.55
            if value in present:
                handles.append(Patch(color=LABEL_COLOURS[name], label=name))
        ax.imshow(display(overlay), origin="lower", aspect=aspect, interpolation="nearest")
        if handles:
            ax.legend(
                handles=handles,
                loc="lower center",
                fontsize=7,
                framealpha=0.6,
                ncol=len(handles),
                handlelength=1.0,
                columnspacing=0.6,
                borderpad=0.3,
                bbox_to_anchor=(0.5, -0.02),
            )
    else:
        ax.text(0.5, 0.5, "no seg", color="0.6", fontsize=14, ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(
        f"{case_dir.name}   axial slice {slice_index}/{shape[2] - 1}   {zooms[0]:g}x{zooms[1]:g}x{zooms[2]:g} mm",
        color="white",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93), w_pad=0.3)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi, facecolor=fig.get_facecolor())
    return out_png


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fedmodal montage``."""
    parser.add_argument("case_dir", help="a BraTS case folder")
    parser.add_argument("-o", "--out", default=None, help="PNG to write (default: <case id>.png here)")
    parser.add_argument(
        "--slice",
        type=int,
        default=None,
        dest="slice_index",
        help="axial slice index (default: the slice with the most tumour)",
    )


def run(args: argparse.Namespace) -> int:
    """Write the montage and print where."""
    out = args.out or f"{Path(args.case_dir).name}.png"
    path = montage(args.case_dir, out, args.slice_index)
    print(f"wrote {path}")
    return 0
