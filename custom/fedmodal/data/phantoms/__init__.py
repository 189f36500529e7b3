"""The phantom federation: BraTS-named multi-modal brain MRI built from real anatomy.

Each case starts from the MNI152 grey- and white-matter probability maps that ship inside the
``nilearn`` wheel (CSF = brain minus GM minus WM), deformed by a small random affine and a smooth
random displacement, with a glioma pushed into the white matter: a necrotic core, an enhancing
rim around it and oedema around both (labels 1, 3 and 2 in fedmodal's canonical order). Each
modality renders the tissues with its own contrast, so the four are complementary:

| tissue      | T1     | T1c    | T2     | FLAIR  |
|-------------|--------|--------|--------|--------|
| white matter| bright | bright | dark   | dark   |
| grey matter | grey   | grey   | grey   | grey   |
| CSF         | dark   | dark   | bright | dark   |
| oedema      | dim    | dim    | bright | bright |
| necrosis    | dark   | dark   | bright | grey   |
| enhancing   | grey   | bright | grey   | grey+  |

Every site has a scanner profile (contrast curve, bias field, Rician noise level, blur,
intensity scale, tumour-size mix). Cases are skull-stripped ``int16`` NIfTI on a BraTS-like
grid (240 x 240 x 155 mm, voxel axes L-P-S like BraTS files, world coordinates in MNI mm),
named as a BraTS release names them; a modality a site lacks has no file. Everything is
derived from one seed: a case depends only on (seed, site, case index) and the shape.

The default ``(96, 96, 62)`` grid has 2.5 mm voxels; ``shape=(240, 240, 155)`` gives BraTS's
native 1 mm grid with the same anatomy and tumours (only voxel noise and partial volume differ;
on grids coarser than 2.67 mm the enhancing rim is kept 1.5 voxels thick so that it shows).
"""

from fedmodal.data.phantoms.cache import build_federation, default_root, ensure_federation
from fedmodal.data.phantoms.case import PhantomCase, generate_case
from fedmodal.data.phantoms.cli import add_arguments, run
from fedmodal.data.phantoms.grid import BRATS_FOV_MM, DEFAULT_SHAPE, grid_affine
from fedmodal.data.phantoms.presets import DEFAULT_PRESET, PRESETS, Preset
from fedmodal.data.phantoms.scanner import ScannerProfile, site_profile
from fedmodal.data.phantoms.spec import DEFAULT_LAYOUT, GENERATOR_VERSION, federation_spec
from fedmodal.data.phantoms.writer import FEDERATION_FILE, TEST_SITE, read_federation, write_case

__all__ = [
    "BRATS_FOV_MM",
    "DEFAULT_LAYOUT",
    "DEFAULT_PRESET",
    "DEFAULT_SHAPE",
    "FEDERATION_FILE",
    "GENERATOR_VERSION",
    "PRESETS",
    "TEST_SITE",
    "PhantomCase",
    "Preset",
    "ScannerProfile",
    "add_arguments",
    "build_federation",
    "default_root",
    "ensure_federation",
    "federation_spec",
    "generate_case",
    "grid_affine",
    "read_federation",
    "run",
    "site_profile",
    "write_case",
]
