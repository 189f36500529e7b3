"""PNG grids a person can look at: mask | synthetic modalities [| real modalities]."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmodal.atomic import save_atomically


def _to_2d(image: np.ndarray) -> np.ndarray:
    """A 2D view of a (H, W) slice or a (H, W, D) volume (its middle axial slice)."""
    image = np.asarray(image, dtype=np.float32)
    while image.ndim > 2 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 3:
        image = image[..., image.shape[-1] // 2]
    return image


def save_grid(rows: list[list[np.ndarray | None]], column_titles: list[str], path: str | Path, title: str = "") -> Path:
    """Draw `rows` of images in [-1, 1] (None draws an "n/a" cell) under `column_titles`.

    Images are drawn with a fixed [-1, 1] grey scale so brightness compares across cells;
    transposed so the first axis runs left-right as radiologists view RAS data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), len(column_titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.8 * n_cols, 1.8 * n_rows + 0.4), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            cell = row[c] if c < len(row) else None
            if cell is None:
                ax.set_facecolor("#333333")
                ax.text(0.5, 0.5, "n/a", color="white", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(np.rot90(_to_2d(cell)), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            if r == 0:
                ax.set_title(column_titles[c], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        return save_atomically(path, lambda temp: fig.savefig(temp, dpi=90))
    finally:
        plt.close(fig)


def mask_picture(cond) -> np.ndarray:
    """A conditioning map (2, *spatial) as one picture: labels in grey, the brain contour white."""
    cond = np.asarray(cond, dtype=np.float32)
    return np.where(cond[1] > 0, 1.0, cond[0])


def grid_array(path: str | Path) -> np.ndarray:
    """The PNG as an (H, W, 3) uint8 array, for TensorBoard."""
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))
