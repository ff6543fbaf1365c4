#!/usr/bin/env python
"""Benchmark: the reference SimpleNet trained four ways, on one device, in one call.

    python scripts/bench.py [--device cpu|cuda] [--epochs 3] [--limit-train N] [--limit-val N] [--json]
                            [--rows fashion_func,tutorial,eager,flax] [--precisions fp32,bf16]
                            [--ensemble K]
    python scripts/bench.py --dp [--dp-batch 256] [--dp-steps 20] [--dp-rounds 1] [--json]
                            [--rows private,opacus,...]

Rows (batch 128, Adam lr 1e-3, same data):
  fashion_func  our training path exactly as scripts/train.py runs it (`app.train` -> `fit`)
  tutorial      torchvision FashionMNIST + ToTensor/Normalize + DataLoader(shuffle),
                nn.Module + torch.optim.Adam
  eager         nn.Module + torch.optim.Adam on device-resident data
  flax          Flax + Optax, jitted step in a Python loop (skipped when jax/flax/optax do not import)
  ensemble K    (with --ensemble K) `train.py --ensemble K`: K SimpleNets in one vmapped step;
                reported as per-model throughput against the solo fashion_func row of the same
                call: K x solo epoch time / ensemble epoch time (1.0x: no faster than K solo runs)

--dp times differentially private training instead, one step on one fixed batch of
Fashion-MNIST (--dp-batch 256, every example kept: a full mask; SGD lr 0.1, max_norm 1.0,
noise multiplier 1.0 where private), all on dpcnn:
  private            our DP-SGD step (`make_train_step(per_example=clip_and_noise(...))`,
                     default chunking), compile="update"
  private_compiled   the same, compile=True
  opacus             Opacus: `PrivacyEngine().make_private` on `interop.DPCNN`, torch.optim.SGD,
                     noise on (its hooks compute the per-example gradients)
  nonprivate         our ordinary step on the same model and batch, compile="update"
  nonprivate_compiled  the same, compile=True
The first --dp-warmup steps are warm-up (they absorb compilation); a row's step time is the
median of the next --dp-steps. Prints each row's examples/s and the ratios: our private
step's throughput over Opacus's, and private over non-private (the cost of privacy). With
--dp-rounds R the rows run R times, interleaved in alternating order, a row's step time is
its median over the rounds, and each ratio shows its range over the rounds: on a shared
machine a slow spell then lands on every row, not on one.

Each row runs in its own subprocess (clean peak memory, no shared thread pools). The
first epoch is the warm-up (it absorbs compilation); seconds per epoch is the median of
the rest. Prints a table with the ratio of each row's epoch time to the tutorial's.

The roofline columns: in the same call, a fixed-size GEMM (2048x2048 on CPU, 8192x8192 on
CUDA, median of 7 runs after warm-up, in a subprocess of its own) measures the device's
matmul rate at each precision timed; a row's achieved rate is the training FLOPs of an
epoch (`summary.train_flops_per_example`, the flop counter over forward and backward,
times the images) over its steady epoch time, and "% GEMM" is that as a share of the
matmul rate at the row's precision: how much of the hardware's own limit is left.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fashion_func.cli.config import COMPILE  # noqa: E402  (the config's words; stdlib-only import)

ROWS = ("fashion_func", "tutorial", "eager", "flax")
DP_ROWS = ("private", "private_compiled", "opacus", "nonprivate", "nonprivate_compiled")
DP_MAX_NORM, DP_NOISE, DP_LR = 1.0, 1.0, 0.1


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _torch_net():
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def _numpy_data(args):
    from fashion_func import data

    train = data.load("train", args.data_dir, limit=args.limit_train)
    test = data.load("test", args.data_dir, limit=args.limit_val)
    return train.images.numpy(), train.labels.numpy(), test.images.numpy(), test.labels.numpy()


def row_fashion_func(args) -> dict:
    import torch

    from fashion_func import data, loop, models
    from fashion_func.cli import app
    from fashion_func.cli import device as device_lib
    from fashion_func.cli.config import Config
    from fashion_func.step import make_eval_step

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(
            model="simplenet", epochs=args.epochs, batch_size=128, lr=1e-3, seed=0, device=args.device,
            precision=args.precision, compile=args.compile, data_dir=args.data_dir,
            limit_train=args.limit_train, limit_val=args.limit_val, tensorboard=False, progress=False,
            out=str(Path(tmp) / "run"),
            ensemble=args.members,
        )  # fmt: skip
        t0 = time.perf_counter()
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            result = app.train(cfg)
        total = time.perf_counter() - t0
        times = [r["epoch_time_s"] for r in result.history]
        if args.members > 1:  # the ensemble's own accuracy; evaluation is timed for solo rows
            return {
                "times": times,
                "acc": result.history[-1]["val_acc"],
                "total_s": total,
                "members": args.members,
            }
        # evaluation of the test images (all 10,000 unless --limit-val) with per-example metrics,
        # after warm-up
        test = data.load("test", args.data_dir, device=args.device, limit=args.limit_val)
        compiled = device_lib.resolve_compile(cfg.compile, test.images.device)
        ev = make_eval_step(models.get("simplenet"), compile=compiled, precision=cfg.precision)
        batches = data.EpochBatches(test, cfg.eval_batch_size, shuffle=False)
        loop.evaluate(ev, result.state, batches(1))
        _sync(args.device)
        t = time.perf_counter()
        loop.evaluate(ev, result.state, batches(1))
        _sync(args.device)
        eval_s = time.perf_counter() - t
        del torch
    return {"times": times, "acc": result.history[-1]["val_acc"], "eval_s": eval_s, "total_s": total}


def row_gemm(args) -> dict:
    """The device's matmul rate at `args.precision` (GFLOP/s): one square GEMM, median of 7."""
    import torch

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    n = 8192 if args.device == "cuda" else 2048
    g = torch.Generator(device=args.device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=args.device).to(dtype)
    b = torch.randn(n, n, generator=g, device=args.device).to(dtype)
    times = []
    for i in range(10):
        _sync(args.device)
        t = time.perf_counter()
        a @ b
        _sync(args.device)
        if i >= 3:  # the first runs warm up the library's kernels and caches
            times.append(time.perf_counter() - t)
    return {"gemm_gflops": 2 * n**3 / statistics.median(times) / 1e9}


def train_flops_per_image() -> float:
    """Training FLOPs (forward + backward) of one SimpleNet image, by the flop counter."""
    import torch

    from fashion_func import models
    from fashion_func.cli import summary

    model = models.get("simplenet")
    return summary.train_flops_per_example(model, model.init(torch.Generator().manual_seed(0)))


def row_tutorial(args) -> dict:
    import torch
    import torchvision
    from torchvision import transforms

    from fashion_func import data

    src, _ = data.locate(args.data_dir)
    root = Path(tempfile.mkdtemp(prefix="fmroot"))
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{split}-{kind}-ubyte"
            if (src / name).exists():
                shutil.copy(src / name, raw / name)
            else:
                with gzip.open(src / f"{name}.gz") as f:
                    (raw / name).write_bytes(f.read())
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    tr = torchvision.datasets.FashionMNIST(str(root), train=True, download=False, transform=tf)
    te = torchvision.datasets.FashionMNIST(str(root), train=False, download=False, transform=tf)
    if args.limit_train:
        tr = torch.utils.data.Subset(tr, range(args.limit_train))
    if args.limit_val:
        te = torch.utils.data.Subset(te, range(args.limit_val))
    tl = torch.utils.data.DataLoader(tr, batch_size=128, shuffle=True)
    vl = torch.utils.data.DataLoader(te, batch_size=1000, shuffle=False)
    torch.manual_seed(0)
    dev = args.device
    model = _torch_net().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for _ in range(args.epochs):
        _sync(dev)
        t = time.perf_counter()
        model.train()
        for x, y in tl:
            x, y = x.to(dev), y.to(dev)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        _sync(dev)
        times.append(time.perf_counter() - t)
    model.eval()
    correct = n = 0
    with torch.no_grad():
        for x, y in vl:
            correct += (model(x.to(dev)).argmax(1).cpu() == y).sum().item()
            n += len(y)
    shutil.rmtree(root, ignore_errors=True)
    return {"times": times, "acc": correct / n}


def row_eager(args) -> dict:
    import torch

    xtr, ytr, xte, yte = _numpy_data(args)
    dev = args.device
    X, Y = torch.from_numpy(xtr).to(dev), torch.from_numpy(ytr).to(dev)
    torch.manual_seed(0)
    model = _torch_net().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def prep(xb):
        return ((xb.float() / 255 - 0.2860) / 0.3530).unsqueeze(1)

    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.epochs):
        perm = torch.randperm(len(X), generator=g).to(dev)
        _sync(dev)
        t = time.perf_counter()
        for i in range(0, len(X), 128):
            idx = perm[i : i + 128]
            loss = torch.nn.functional.cross_entropy(model(prep(X[idx])), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        _sync(dev)
        times.append(time.perf_counter() - t)
    with torch.no_grad():
        pred = torch.cat([model(prep(torch.from_numpy(xte[i : i + 1000]).to(dev))).argmax(1).cpu()
                          for i in range(0, len(xte), 1000)])  # fmt: skip
    return {"times": times, "acc": float((pred.numpy() == yte).mean())}


def row_flax(args) -> dict:
    try:
        import flax.linen as nn
        import jax
        import jax.numpy as jnp
        import optax
    except ImportError as exc:
        return {"skipped": f"jax/flax/optax not importable ({exc.name})"}
    import numpy as np

    xtr, ytr, xte, yte = _numpy_data(args)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
            x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
            x = x.reshape(x.shape[0], -1)
            x = nn.relu(nn.Dense(128)(x))
            return nn.Dense(10)(x)

    net = Net()
    key = jax.random.PRNGKey(0)
    params = net.init(key, jnp.zeros((1, 28, 28, 1)))
    tx = optax.adam(1e-3)
    opt = tx.init(params)
    X, Y = jnp.asarray(xtr), jnp.asarray(ytr.astype(np.int32))

    def prep(xb):
        return ((xb.astype(jnp.float32) / 255.0 - 0.2860) / 0.3530)[..., None]

    def loss_fn(p, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(net.apply(p, prep(xb)), yb).mean()

    @jax.jit
    def step(p, o, xb, yb):
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    rng = np.random.default_rng(0)
    times = []
    for _ in range(args.epochs):
        perm = rng.permutation(len(xtr))
        t = time.perf_counter()
        for i in range(0, len(xtr), 128):
            idx = perm[i : i + 128]
            params, opt, loss = step(params, opt, X[idx], Y[idx])
        loss.block_until_ready()
        times.append(time.perf_counter() - t)
    logits = jax.jit(lambda p, x: net.apply(p, prep(x)))(params, jnp.asarray(xte))
    return {"times": times, "acc": float((np.asarray(logits).argmax(1) == yte).mean())}


def _dp_batch(args):
    """The fixed batch: the first --dp-batch training images (uint8) and labels, on the device."""
    from fashion_func import data

    train = data.load("train", args.data_dir, device=args.device, limit=args.dp_batch)
    return train.images, train.labels


def _time_steps(args, run_step) -> dict:
    """`run_step()` --dp-warmup + --dp-steps times, each timed (synchronised on CUDA)."""
    times = []
    for _ in range(args.dp_warmup + args.dp_steps):
        _sync(args.device)
        t = time.perf_counter()
        run_step()
        _sync(args.device)
        times.append(time.perf_counter() - t)
    return dp_step_record(times, args.dp_warmup, args.dp_batch)


def dp_step_record(times: list[float], warmup: int, batch: int) -> dict:
    """A --dp row's record from every step's seconds: the first `warmup` are summed as its
    warm-up, the rest are `times`; its step time is their median and its throughput is
    `batch` examples per step time."""
    warm, timed = times[:warmup], times[warmup:]
    step_s = statistics.median(timed)
    return {"times": timed, "warmup_s": sum(warm), "step_s": step_s, "examples_per_s": batch / step_s}


def row_dp_ours(args) -> dict:
    """Our step on dpcnn: private (per_example=, a full mask) or not, compile as the row says."""
    import torch

    from fashion_func import models, optim, privacy, state, step

    private, compiled = args.row.startswith("private"), args.row.endswith("_compiled")
    images, labels = _dp_batch(args)
    model, tx = models.get("dpcnn"), optim.sgd(DP_LR)
    st = state.create(model.init(torch.Generator().manual_seed(0), device=args.device), tx, seed=0)
    dp = privacy.clip_and_noise(DP_MAX_NORM, DP_NOISE, expected_batch_size=args.dp_batch) if private else None
    train_step = step.make_train_step(model, tx, compile=True if compiled else "update", per_example=dp)
    batch = (images, labels, torch.ones_like(labels, dtype=torch.bool)) if private else (images, labels)
    holder = [st]

    def run_step():
        holder[0], metrics = train_step(holder[0], batch)
        return metrics

    return _time_steps(args, run_step)


def row_dp_opacus(args) -> dict:
    """Opacus's DP-SGD on the plain module `interop.DPCNN`, the same batch, noise on."""
    import warnings

    import torch
    import torch.nn.functional as F
    from opacus import PrivacyEngine

    from fashion_func import interop, models, preprocess

    images, labels = _dp_batch(args)
    x = preprocess.normalize(images)  # float NCHW, as our step's preprocess computes it
    module = interop.DPCNN().to(args.device)
    module.load_state_dict(models.get("dpcnn").init(torch.Generator().manual_seed(0), device=args.device))
    dataset = torch.utils.data.TensorDataset(x, labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.dp_batch, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its secure-RNG advice, its hooks' notes
        dp_module, opt, _ = PrivacyEngine().make_private(
            module=module, optimizer=torch.optim.SGD(module.parameters(), lr=DP_LR), data_loader=loader,
            noise_multiplier=DP_NOISE, max_grad_norm=DP_MAX_NORM, poisson_sampling=False,
        )  # fmt: skip

        def run_step():
            opt.zero_grad()
            F.cross_entropy(dp_module(x), labels).backward()
            opt.step()

        return _time_steps(args, run_step)


def run_row(args) -> dict:
    """Runs in the child process: one row, one JSON line on stdout."""
    fn = {"fashion_func": row_fashion_func, "tutorial": row_tutorial, "eager": row_eager, "flax": row_flax,
          "ensemble": row_fashion_func, "gemm": row_gemm, "opacus": row_dp_opacus,
          **{r: row_dp_ours for r in DP_ROWS if r != "opacus"}}  # fmt: skip
    result = fn[args.row](args)
    if "times" in result:
        result["peak_mb"] = _peak_mb(args.device)
    return result


def _child_cmd(args, row: str, precision: str) -> list[str]:
    cmd = [sys.executable, __file__, "--row", row, "--device", args.device, "--epochs", str(args.epochs),
           "--precision", precision]  # fmt: skip
    if args.limit_train:
        cmd += ["--limit-train", str(args.limit_train)]
    if args.limit_val:
        cmd += ["--limit-val", str(args.limit_val)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    cmd += ["--compile", args.compile, "--members", str(args.ensemble if row == "ensemble" else 1)]
    cmd += [
        "--dp-batch",
        str(args.dp_batch),
        "--dp-steps",
        str(args.dp_steps),
        "--dp-warmup",
        str(args.dp_warmup),
    ]
    return cmd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--epochs", type=int, default=3, help="epochs per row; the first is warm-up (>= 3)")
    ap.add_argument("--limit-train", type=int, default=None, help="train on the first N examples")
    ap.add_argument(
        "--limit-val", type=int, default=None, help="evaluate the first N test images (all 10,000)"
    )
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    ap.add_argument("--precisions", default="fp32", help="fashion_func precisions to time, e.g. fp32,bf16")
    ap.add_argument(
        "--compile",
        choices=COMPILE,
        default="auto",
        help="fashion_func row's step, as train.py's --compile (cli.device.resolve_compile): on, off, "
        "update (only the optimizer update); auto: on with CUDA, update on the CPU",
    )
    ap.add_argument("--no-compile", dest="compile", action="store_const", const="off")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument(
        "--ensemble",
        type=int,
        default=0,
        help="also time K SimpleNets in one vmapped step against the solo row",
    )
    ap.add_argument("--dp", action="store_true", help="time DP-SGD: ours against Opacus and non-private")
    ap.add_argument("--dp-batch", type=int, default=256, help="--dp: the fixed batch's size")
    ap.add_argument("--dp-steps", type=int, default=20, help="--dp: timed steps per row (the median is kept)")
    ap.add_argument("--dp-warmup", type=int, default=2, help="--dp: untimed steps first (compilation)")
    ap.add_argument("--dp-rounds", type=int, default=1,
                    help="--dp: run the rows this many times, interleaved (a shared machine's slow spell "
                         "then hits every row); a row's step time is its median over the rounds")  # fmt: skip
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--members", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.epochs < 3:
        ap.error("--epochs must be at least 3 (one warm-up, two timed)")
    if args.row:
        print(json.dumps(run_row(args)), flush=True)
        return 0
    if args.dp:
        return _main_dp(ap, args)

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows: {', '.join(sorted(unknown))}")
    if args.ensemble == 1 or args.ensemble < 0:
        ap.error("--ensemble must be at least 2")
    if args.ensemble:  # the solo row is the ensemble's baseline: always run it
        rows = [*dict.fromkeys(["fashion_func", *rows]), "ensemble"]
    ours = ("fashion_func", "ensemble")
    jobs = [(r, p) for r in rows for p in (args.precisions.split(",") if r in ours else ["fp32"])]
    jobs += [("gemm", p) for p in dict.fromkeys(p for _, p in jobs)]  # the roofline of each precision
    results = []
    for row, precision in jobs:
        name = {
            "fashion_func": f"fashion_func ({precision})",
            "ensemble": f"ensemble {args.ensemble} ({precision})",
            "gemm": f"gemm ({precision})",
        }
        name = name.get(row, row)
        print(f"running {name} ...", file=sys.stderr, flush=True)
        env = dict(os.environ, JAX_PLATFORMS="cuda" if args.device == "cuda" else "cpu")
        proc = subprocess.run(_child_cmd(args, row, precision), capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
            results.append({"row": name, "skipped": f"failed: {tail[0]}"})
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["row"], res["precision"] = name, precision
        results.append(res)

    import torch

    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    n = args.limit_train or 60000
    flops = train_flops_per_image()  # the flop counter runs once
    rows, gemm = table_rows(results, n * flops)
    print(f"\n{dev_name}, torch {torch.__version__}, {n} training images, {args.epochs} epochs "
          f"({time.strftime('%Y-%m-%d')})")  # fmt: skip
    header = (f"{'row':<22}{'s/epoch':>9}{'vs tutorial':>13}{'warm-up s':>11}{'test acc':>10}{'peak MB':>9}"
              f"{'GFLOP/s':>9}{'% GEMM':>8}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:
        if "steady_s" not in r:
            print(f"{r['row']:<22}  skipped: {r['skipped']}")
            continue
        ratio = f"{r['vs_tutorial']:.2f}x" if r["vs_tutorial"] is not None else "-"
        roof = f"{r['gflops']:>9.1f}" + (f"{r['pct_gemm']:>7.0f}%" if "pct_gemm" in r else f"{'-':>8}")
        print(f"{r['row']:<22}{r['steady_s']:>9.2f}{ratio:>13}{r['warmup_s']:>11.1f}{r['acc']:>10.4f}"
              f"{r['peak_mb']:>9.0f}{roof}")  # fmt: skip
    for p, g in gemm.items():
        print(
            f"GEMM {p}: {g['gemm_gflops']:.0f} GFLOP/s" if "gemm_gflops" in g else f"GEMM {p}: {g['skipped']}"
        )
    print(f"training FLOPs per image (forward + backward): {flops / 1e6:.1f} MFLOP")
    for r in rows:
        if "eval_pct" in r:
            n_test = args.limit_val or 10_000
            print(f"{r['row']}: evaluating {n_test:,} test images takes {r['eval_s']:.2f} s "
                  f"({r['eval_pct']:.1f}% of a training epoch)")  # fmt: skip
    for r in rows:
        if "per_model_throughput" in r:
            k, ratio, solo = r["members"], r["per_model_throughput"], r["solo_steady_s"]
            print(f"{r['row']}: {r['steady_s']:.2f} s/epoch for {k} models against {k} x "
                  f"{solo:.2f} s solo: per-model throughput {ratio:.2f}x a solo run")  # fmt: skip
    if args.json:
        rates = {p: g.get("gemm_gflops") for p, g in gemm.items()}
        print(json.dumps({"device": dev_name, "epochs": args.epochs, "train_images": n, "rows": rows,
                          "gemm_gflops": rates, "train_flops_per_image": flops}))  # fmt: skip
    return 0


def _main_dp(ap: argparse.ArgumentParser, args) -> int:
    """--dp: the DP rows (each in its own subprocess), their table and ratios."""
    if min(args.dp_batch, args.dp_steps, args.dp_warmup, args.dp_rounds) < 1:
        ap.error("--dp-batch, --dp-steps, --dp-warmup and --dp-rounds must be at least 1")
    given = args.rows if args.rows != ",".join(ROWS) else ",".join(DP_ROWS)
    rows = [r.strip() for r in given.split(",") if r.strip()]
    unknown = set(rows) - set(DP_ROWS)
    if unknown:
        ap.error(f"unknown --dp rows: {', '.join(sorted(unknown))}; choose from {', '.join(DP_ROWS)}")
    rounds = []
    for k in range(args.dp_rounds):
        done = {}
        for row in rows if k % 2 == 0 else rows[::-1]:  # alternate the order: no row always first
            print(f"running {row} (round {k + 1} of {args.dp_rounds}) ...", file=sys.stderr, flush=True)
            proc = subprocess.run(_child_cmd(args, row, "fp32"), capture_output=True, text=True)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
                done[row] = {"row": row, "skipped": f"failed: {tail[0]}"}
                continue
            done[row] = {"row": row, **json.loads(proc.stdout.strip().splitlines()[-1])}
        rounds.append([done[r] for r in rows])
    results = dp_merge_rounds(rounds, args.dp_batch)
    import torch

    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    print(f"\n{dev_name}, torch {torch.__version__}, dpcnn, one batch of {args.dp_batch}, median of "
          f"{args.dp_steps} steps after {args.dp_warmup} warm-up ({time.strftime('%Y-%m-%d')})")  # fmt: skip
    header = f"{'row':<22}{'ms/step':>10}{'examples/s':>12}{'warm-up s':>11}{'peak MB':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        if "step_s" not in r:
            print(f"{r['row']:<22}  skipped: {r['skipped']}")
            continue
        print(f"{r['row']:<22}{1000 * r['step_s']:>10.1f}{r['examples_per_s']:>12.0f}{r['warmup_s']:>11.1f}"
              f"{r['peak_mb']:>9.0f}")  # fmt: skip
    ratios = dp_ratios(results)
    for name, value in ratios.items():
        each = [dp_ratios(r).get(name) for r in rounds]
        spread = (f" (rounds: {min(each):.2f}x to {max(each):.2f}x)"
                  if len(rounds) > 1 and None not in each else "")  # fmt: skip
        print(f"{name}: {value:.2f}x{spread}")
    if args.json:
        print(json.dumps({"device": dev_name, "batch": args.dp_batch, "steps": args.dp_steps,
                          "rounds": args.dp_rounds, "rows": results, "ratios": ratios}))  # fmt: skip
    return 0


def dp_merge_rounds(rounds: list[list[dict]], batch: int) -> list[dict]:
    """One record per row from --dp-rounds rounds of the same rows (each round a list of row
    records in the same order): a row timed in every round gets the median of its rounds' step
    times (and warm-ups), its throughput from that, its largest peak and every timed step; a
    row skipped in any round is skipped, with the first reason."""
    merged = []
    for records in zip(*rounds, strict=True):
        skipped = [r for r in records if "step_s" not in r]
        if skipped:
            merged.append(skipped[0])
            continue
        step_s = statistics.median(r["step_s"] for r in records)
        merged.append({**records[0], "step_s": step_s, "examples_per_s": batch / step_s,
                       "warmup_s": statistics.median(r["warmup_s"] for r in records),
                       "peak_mb": max(r.get("peak_mb", 0.0) for r in records),
                       "times": [t for r in records for t in r["times"]]})  # fmt: skip
    return merged


def dp_ratios(results: list[dict]) -> dict[str, float]:
    """Throughput ratios of the DP rows present: ours over Opacus's, private over non-private."""
    rate = {r["row"]: r["examples_per_s"] for r in results if "examples_per_s" in r}
    out = {}
    for mode, suffix in (("update", ""), ("compiled", "_compiled")):
        ours = rate.get(f"private{suffix}")
        if ours and "opacus" in rate:
            out[f"ours/opacus throughput (private, {mode})"] = ours / rate["opacus"]
        plain = rate.get(f"nonprivate{suffix}")
        if ours and plain:
            out[f"private/non-private throughput ({mode})"] = ours / plain
    return out


def table_rows(record: list[dict], epoch_flops: float) -> tuple[list[dict], dict[str, dict]]:
    """The benchmark table from its timing record (pure: `record` is left as it was).

    `record` holds one dict per child run, named by `row` and `precision`: a timed row has
    `times` (seconds per epoch, the first the warm-up; `members` for an ensemble, `eval_s`
    where evaluation was timed), a `gemm (...)` row has `gemm_gflops`, a failed run `skipped`.
    `epoch_flops` is one model's training FLOPs over an epoch's images. Returns the training
    rows, each timed one with
      steady_s, warmup_s    the median of the epochs after the first; the first
      vs_tutorial           the tutorial row's steady_s over this row's (None without one)
      gflops, pct_gemm      members x epoch_flops / steady_s, in GFLOP/s; its percentage of
                            the GEMM rate at the row's precision (when that was measured)
      eval_pct              eval_s as a percentage of steady_s (rows that timed evaluation)
      per_model_throughput  ensemble rows: members x the solo row's steady_s (solo_steady_s)
                            / this row's
    and the GEMM rows by precision.
    """
    rows, gemm = [], {}
    for res in record:
        r = dict(res)
        if r["row"].startswith("gemm"):
            gemm[r["precision"]] = r
            continue
        if "times" in r:
            r["steady_s"] = statistics.median(r["times"][1:])
            r["warmup_s"] = r["times"][0]
        rows.append(r)
    rates = {p: g["gemm_gflops"] for p, g in gemm.items() if "gemm_gflops" in g}
    base = next((r["steady_s"] for r in rows if r["row"] == "tutorial" and "steady_s" in r), None)
    by_row = {r["row"]: r for r in rows}
    for r in rows:
        if "steady_s" not in r:
            continue
        r["vs_tutorial"] = base / r["steady_s"] if base else None
        r["gflops"] = r.get("members", 1) * epoch_flops / r["steady_s"] / 1e9
        if r["precision"] in rates:  # not when its GEMM run failed
            r["pct_gemm"] = 100 * r["gflops"] / rates[r["precision"]]
        if "eval_s" in r:
            r["eval_pct"] = 100 * r["eval_s"] / r["steady_s"]
        if "members" in r:
            k = r["members"]
            solo = by_row.get(r["row"].replace(f"ensemble {k}", "fashion_func"), {})
            if "steady_s" in solo:
                r["solo_steady_s"] = solo["steady_s"]
                r["per_model_throughput"] = k * solo["steady_s"] / r["steady_s"]
    return rows, gemm


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    sys.exit(main())
