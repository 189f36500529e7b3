"""FedMEPD: seconds per round federated against the same work without NVFlare, and its parts.

Both sides run the job's own settings (fedmodal.jobs) on the fedmepd phantom federation:
without federation, 8 client processes train their local epochs with anchors at once, then
one process runs the server's full-modal epoch and anchor pooling (the order a round has);
federated, `nvflare simulator` runs jobs/fedmepd with only the round count changed. Also:
bytes per round per client (payload audit), the server epoch's seconds (server log), and the
cost of the anchor cross-attention: alone at each scale, and the whole network's forward +
backward with and without it. Every process runs one torch thread (OMP_NUM_THREADS=1) on both
sides, so 8 clients do not oversubscribe the cores; the default job gives the server all cores.

    python benchmarks/bench_fedmepd.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLIENTS = [f"site-{k}" for k in range(1, 9)]


def job_settings(**values) -> dict:
    """jobs/fedmepd's settings by section (fedmodal.jobs), with `values` changed."""
    from fedmodal.jobs import job_settings as settings_of

    return settings_of("fedmepd", **values)


def worker(site: str, root: Path, rounds: int) -> dict:
    """One participant's per-round work without NVFlare (a client, or "server": epoch + anchors)."""
    import torch

    from fedmodal.baselines.data import site_data, train_loader
    from fedmodal.fedmepd.anchors import AnchorBank
    from fedmodal.fedmepd.trainer import FedMEPDTrainer
    from fedmodal.fl.site import SiteConfig, prepare_site

    torch.set_num_threads(1)
    settings = job_settings(**{"site.data_root": str(root)})
    cfg, run = settings["fedmepd"], settings["server"]
    config = settings["site"] if site != "server" else SiteConfig(data_root=str(root), preset="fedmepd")
    prepared = prepare_site(site, config, run.seed)
    data = site_data(prepared.manifest)
    cases = data.cases("train") if site != "server" else data.cases("all")
    loader = train_loader(cases, cfg.seg_config(), prepared.seed)
    trainer = FedMEPDTrainer(cfg, data.modalities, seed=prepared.seed)
    bank = AnchorBank(num_classes=4, k=cfg.anchors_k, momentum=cfg.anchor_ema, min_cluster_size=cfg.min_cluster_size)
    if site != "server":  # clients calibrate with anchors of the right shapes
        server = FedMEPDTrainer(cfg, seed=0)
        bank.update(server.fused_features(loader))
    times = []
    for _ in range(rounds):
        start = time.time()
        trainer.load_groups(trainer.state_numpy(["enc.", "dec."]), groups=["enc.", "dec."])
        for _ in range(run.local_epochs if site != "server" else 1):
            trainer.train_epoch(loader, bank.anchors() if site != "server" else None)
        if site == "server":
            bank.update(trainer.fused_features(loader))
        times.append(time.time() - start)
    return {"site": site, "round_s": times}


def run_local(root: Path, rounds: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def spawn(site):
        args = [sys.executable, __file__, "--worker", site, "--root", str(root), "--rounds", str(rounds)]
        return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)

    start = time.time()
    clients = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in [spawn(s) for s in CLIENTS]]
    server = json.loads(spawn("server").communicate()[0].strip().splitlines()[-1])
    per_round = [max(c["round_s"][r] for c in clients) + server["round_s"][r] for r in range(1, rounds)]
    return {
        "wall_s": time.time() - start,
        "round_s": sum(per_round) / len(per_round),
        "server_s": server["round_s"][1:],
    }


def run_simulator(root: Path, rounds: int, work: Path) -> dict:
    from fedmodal.fl.allow_list import customize_simulator
    from fedmodal.jobs import JOBS
    from fedmodal.jobs.spec import export_job, route_settings

    spec = JOBS["fedmepd"]
    job = export_job(spec, work / "jobs", route_settings(spec, {"num_rounds": rounds}))
    customize_simulator(work / "ws")
    env = {**os.environ, "HOME": str(work), "FEDMODAL_DATA_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    nvflare = Path(sys.executable).with_name("nvflare")
    start = time.time()
    done = subprocess.run(
        [str(nvflare), "simulator", str(job), "-w", str(work / "ws"), "-n", "8", "-t", "8"],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.time() - start
    if done.returncode != 0:
        raise SystemExit(f"simulator failed:\n{(done.stdout + done.stderr)[-3000:]}")
    lines = (done.stdout + done.stderr).splitlines()
    rounds_s = [json.loads(x.split("round ", 1)[1])["seconds"] for x in lines if 'round {"round"' in x][1:]
    server_s = [json.loads(x.split("server ", 1)[1])["server_epoch_s"] for x in lines if 'server {"round"' in x]
    per_site = {}
    for site in CLIENTS:
        audit = [
            json.loads(x) for x in (work / "ws" / site / "simulate_job/payload_audit.jsonl").read_text().splitlines()
        ]
        train = [r for r in audit if r["task"] == "train"]
        per_site[site] = sum(sum(i["bytes"] or 0 for i in r["items"].values()) for r in train) / rounds
    return {
        "wall_s": wall,
        "round_s": sum(rounds_s) / len(rounds_s),
        "server_epoch_s": server_s,
        "bytes_per_round": per_site,
    }


def seconds_per_call(fn, repeats: int, *args) -> float:
    fn(*args)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - start) / repeats


def fwd_bwd(module, *inputs) -> None:
    module(*inputs).sum().backward()


def attention_cost(repeats: int = 5) -> dict:
    """Forward + backward of one training batch: the anchor attention alone at each scale, and
    the whole network with anchors (every scale calibrated) and without (no attention)."""
    import torch

    from fedmodal.fedmepd.config import FedMEPDConfig
    from fedmodal.nets.fedmepd import FedMEPDNet
    from fedmodal.nets.fedmepd_blocks import AnchorAttention

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = job_settings()["fedmepd"]
    assert isinstance(cfg, FedMEPDConfig)
    size = list(cfg.patch_size)
    anchors = [torch.randn(4 * cfg.anchors_k, c) for c in cfg.channels]
    rows = []
    for scale, (channels, heads) in enumerate(zip(cfg.channels, cfg.heads)):
        grid = [max(1, s // 2**scale) for s in size]
        features = torch.randn(cfg.batch_size, channels, *grid, requires_grad=True)
        attn = AnchorAttention(channels, heads)
        ms = 1000 * seconds_per_call(fwd_bwd, repeats, attn, features, anchors[scale])
        rows.append({"scale": scale, "grid": grid, "channels": channels, "heads": heads, "ms": round(ms, 2)})
    net = FedMEPDNet(**cfg.net_args())
    images = torch.randn(cfg.batch_size, 4, *size)
    present = torch.ones(cfg.batch_size, 4, dtype=torch.bool)

    def step(with_anchors):
        out = net(images, present, anchors if with_anchors else None)
        (out.logits.sum() + sum(a.sum() for a in out.aux.values())).backward()

    network = {
        name: round(1000 * seconds_per_call(step, repeats, flag), 1)
        for name, flag in (("with_anchors_ms", True), ("without_anchors_ms", False))
    }
    return {"per_scale": rows, "network": network}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (>= 2; the first is not timed)")
    parser.add_argument("--out", default=None, help="also write the numbers here (JSON + Markdown)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.root), args.rounds)))
        return 0
    if args.rounds < 2:
        raise SystemExit("--rounds must be at least 2")
    from fedmodal.data.phantoms import ensure_federation

    root = ensure_federation("fedmepd")
    with tempfile.TemporaryDirectory(prefix="bench-fedmepd-") as work:
        fed = run_simulator(root, args.rounds, Path(work))
    local = run_local(root, args.rounds)
    attention = attention_cost()
    lines = [
        f"FedMEPD round vs the same work without NVFlare: 8 clients + the server epoch, {args.rounds - 1} timed "
        f"rounds, nproc {os.cpu_count()}",
        "",
        "| run | s/round | total wall s | ratio |",
        "|---|---|---|---|",
        f"| no federation (clients at once, then the server epoch) | {local['round_s']:.2f} | {local['wall_s']:.1f} | 1.00 |",
        f"| NVFlare simulator | {fed['round_s']:.2f} | {fed['wall_s']:.1f} | {fed['round_s'] / local['round_s']:.2f} |",
        "",
        f"Server training epoch (federated, server log): {', '.join(f'{s:.1f}' for s in fed['server_epoch_s'])} s; "
        f"epoch + anchor pooling without NVFlare: {', '.join(f'{s:.1f}' for s in local['server_s'])} s",
        "",
        "| client | bytes per round (both ways) |",
        "|---|---|",
        *[f"| {s} | {b / 1024:.1f} KiB |" for s, b in fed["bytes_per_round"].items()],
        "",
        "| scale | grid | channels | heads | attention fwd+bwd (ms, one batch) |",
        "|---|---|---|---|---|",
        *[
            f"| {a['scale']} | {'x'.join(map(str, a['grid']))} | {a['channels']} | {a['heads']} | {a['ms']} |"
            for a in attention["per_scale"]
        ],
        "",
        f"Whole network, one batch fwd+bwd (1 thread): {attention['network']['with_anchors_ms']} ms with anchors, "
        f"{attention['network']['without_anchors_ms']} ms without (no attention).",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_fedmepd.md").write_text(table + "\n")
        (out / "bench_fedmepd.json").write_text(
            json.dumps({"simulator": fed, "local": local, "attention": attention}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
