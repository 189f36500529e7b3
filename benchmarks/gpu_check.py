"""GPU check for a site or server with CUDA: does fedmodal use the GPU well, federated and not?

On a CUDA machine, in a few minutes:
- ModalityBank's paper profile (256x256 slices, ngf 64, 9 blocks, ndf 64) for a fixed number of
  steps per phase, centrally (every site's worker in this process) and federated (NVFlare's
  simulator, 3 sites, same job): steps/s, the federated/central ratio, peak GPU memory (this
  process; in the simulator the server's and each site's), bytes per step per site;
- one FedAvg round of the 3D segmentation network (unet3d-brats, timed after a warm-up round)
  in the simulator and as the same three sites' rounds without NVFlare.
It prints the numbers as JSON (and writes them to --out). On a machine without CUDA it says so
and exits 0, unless --allow-cpu asks to run the same check on the CPU (slow at the paper size:
use --profile default there).

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --steps 20 --out gpu_check.json
    python benchmarks/gpu_check.py --allow-cpu --profile default --steps 6
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fedavg  # noqa: E402
import bench_modalitybank  # noqa: E402

SITES = ["site-1", "site-2", "site-3"]
FEDAVG_3D = {"seg.net": "unet3d-brats", "seg.batch_size": 2, "seg.samples_per_case": 2}


def device_facts() -> dict:
    facts = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version()}
    if torch.cuda.is_available():
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        from fedmodal.amp import cuda_has_bf16

        facts["native_bf16"] = [cuda_has_bf16(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
        facts["cudnn"] = torch.backends.cudnn.version()
    return facts


def no_cuda_message() -> str:
    build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    return (
        f"no CUDA device: torch {torch.__version__} ({build}) sees none, so there is nothing to check here. "
        "Run this on a GPU host (with a CUDA build of torch); --allow-cpu runs the same check on the CPU."
    )


def audit_bytes_per_round(audit: Path, rounds: int) -> float | None:
    """A site's bytes (both ways) per FedAvg round, from its payload audit."""
    if not audit.is_file():
        return None
    records = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    total = sum(i["bytes"] or 0 for r in records for i in r["items"].values())
    return total / rounds


def modalitybank(steps: int, data_root: Path, profile: str | None) -> dict:
    central = bench_modalitybank.central(steps, data_root, 0, profile)
    federated = bench_modalitybank.federated(steps, data_root, "direct", 0.05, 0, profile)
    phases = ("pretrain", "bank")
    return {
        "profile": profile or "default",
        "steps_per_phase": steps,
        "central_steps_per_second": {p: central[p] for p in phases},
        "federated_steps_per_second": federated["steps_per_second"],
        "federated_over_central": {p: federated["steps_per_second"][p] / central[p] for p in phases},
        "peak_gpu_memory_bytes": {"central": central["peak_gpu_memory_bytes"], **federated["peak_gpu_memory_bytes"]},
        "bytes_per_step": {site: row["bytes_per_step"] for site, row in federated["per_site"].items()},
    }


def fedavg_3d(data_root: Path) -> dict:
    rounds, epochs = 2, 1  # the first round pays warm-up (allocation, cuDNN's kernel search)
    with tempfile.TemporaryDirectory(prefix="gpu-fedavg-") as work:
        simulated = bench_fedavg.run_simulator(SITES, data_root, rounds, epochs, Path(work), FEDAVG_3D)
        sent = {
            s: audit_bytes_per_round(Path(work) / "ws" / s / "simulate_job/payload_audit.jsonl", rounds) for s in SITES
        }
    local = bench_fedavg.run_lockstep(SITES, data_root, rounds, epochs, FEDAVG_3D)
    return {
        "net": FEDAVG_3D["seg.net"],
        "local_epochs": epochs,
        "federated_round_seconds": simulated["round_s"],
        "without_federation_round_seconds": local["round_s"],
        "federated_over_central_rate": local["round_s"] / simulated["round_s"],
        "bytes_per_round": sent,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="ModalityBank steps per phase (default 20)")
    parser.add_argument(
        "--profile", default="paper", choices=["paper", "default"], help="ModalityBank's job profile (default paper)"
    )
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no CUDA device")
    parser.add_argument("--skip-fedavg", action="store_true", help="only the ModalityBank part")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(no_cuda_message())
        return 0
    from fedmodal.data.phantoms import ensure_federation

    data_root = ensure_federation()
    results = {"machine": device_facts()}
    results["modalitybank"] = modalitybank(args.steps, data_root, None if args.profile == "default" else args.profile)
    if not args.skip_fedavg:
        results["fedavg_3d"] = fedavg_3d(data_root)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
