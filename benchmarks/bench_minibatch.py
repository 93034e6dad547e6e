"""Streamed Parquet: epoch time and peak RSS of mini-batch adam (one process vs torchrun ×2),
and Levenberg–Marquardt over streamed rows vs SciPy ``least_squares`` on the rows in memory.

Data: ``y = 2.5 exp(-1.3 x) + 0.4 + 0.02 noise``, x uniform on [0, 4], float64, written once
to a Parquet file in row groups of 2^20 rows (generated chunk by chunk: the generator never
holds the whole table either). Each fit runs in a fresh process (``fitting/streamed.py``'s
``fit_streamed``, as ``gradfit fit DATA --batch-size`` does); a process reports its own peak
RSS (``ru_maxrss``), its epoch time (from the epoch hook) and its whole run (the statistics'
extra pass included). Under torchrun, each rank reads every other row group and the figures
are rank 0's (the peak RSS is the larger of the two).

Run: .venv/bin/python benchmarks/bench_minibatch.py [--rows 20000000] [--lm-rows 10000000]
     [--batch-size 65536] [--epochs 1] [--no-torchrun] [--no-scipy] [--folder /tmp/bench]
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

import numpy as np

MODEL = "a*exp(-k*x) + c"
GROUP = 1 << 20

CHILD = """
import json, os, resource, sys, time
t0 = time.perf_counter()
import torch
import gradfit as gf
from gradfit.fitting.streamed import Columns, fit_streamed
from gradfit.io.streamed import ParquetRows
from gradfit.options import FitOptions

path, optimizer, batch, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
marks = []
def hook(epoch, loss):
    marks.append(time.perf_counter())
options = FitOptions(optimizer=optimizer, p0=[1.0, 1.0, 0.0], seed=0,
                     **({"batch_size": batch, "lr": 0.01, "epochs": epochs}
                        if optimizer != "lm" else {}))
start = time.perf_counter()
result = fit_streamed(gf.Model(sys.argv[5]), ParquetRows(path, ["x", "y"]),
                      Columns(["x"], "y", None, False), options, hook=hook)
end = time.perf_counter()
rank = int(os.environ.get("RANK", "0"))
report = {"rank": rank, "run_s": end - start, "import_s": start - t0,
          "epoch_s": [b - a for a, b in zip([start] + marks, marks)],
          "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "n_iter": result.n_iter, "status": result.status, "params": result.params,
          "n_points": result.n_points}
print("BENCH " + json.dumps(report), flush=True)
"""


def write_data(path: Path, rows: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    schema = pa.schema([("x", pa.float64()), ("y", pa.float64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, GROUP):
            n = min(GROUP, rows - start)
            x = rng.uniform(0, 4, n)
            y = 2.5 * np.exp(-1.3 * x) + 0.4 + 0.02 * rng.standard_normal(n)
            writer.write_table(pa.table({"x": x, "y": y}, schema=schema), row_group_size=GROUP)


def run_child(path: Path, optimizer: str, batch: int, epochs: int, ranks: int) -> list[dict]:
    script = Path(tempfile.mkdtemp()) / "child.py"
    script.write_text(CHILD)
    args = [str(script), str(path), optimizer, str(batch), str(epochs), MODEL]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    if ranks == 1:
        command = [sys.executable, *args]
    else:
        torchrun = Path(sys.executable).parent / "torchrun"
        command = [str(torchrun), "--nproc-per-node", str(ranks), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    return sorted((json.loads(line[6:]) for line in lines), key=lambda r: r["rank"])


def scipy_lm(path: Path) -> dict:
    """SciPy's least_squares on the whole table in memory (its own process for the RSS)."""
    code = f"""
import json, resource, time
import numpy as np, pyarrow.parquet as pq
from scipy.optimize import least_squares
t = pq.read_table({str(path)!r}); x = t.column("x").to_numpy(); y = t.column("y").to_numpy()
del t
def r(p): return p[0] * np.exp(-p[1] * x) + p[2] - y
def jac(p):
    e = np.exp(-p[1] * x); return np.stack([e, -p[0] * x * e, np.ones_like(x)], axis=1)
start = time.perf_counter()
fit = least_squares(r, [1.0, 1.0, 0.0], jac=jac, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15)
end = time.perf_counter()
print("BENCH " + json.dumps({{"run_s": end - start, "nfev": int(fit.nfev),
      "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "params": dict(zip("akc", fit.x.tolist()))}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)  # fmt: skip
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.split("BENCH ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--lm-rows", type=int, default=10_000_000)
    parser.add_argument("--batch-size", type=int, default=65536)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--no-torchrun", action="store_true")
    parser.add_argument("--no-scipy", action="store_true")
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench_minibatch_"))
    folder.mkdir(parents=True, exist_ok=True)
    big, lm = folder / f"adam_{args.rows}.parquet", folder / f"lm_{args.lm_rows}.parquet"
    for path, rows in ((big, args.rows), (lm, args.lm_rows)):
        if not path.exists():
            t = time.perf_counter()
            write_data(path, rows)
            print(f"wrote {path} ({rows:,} rows) in {time.perf_counter() - t:.1f} s")
    print(f"\nmini-batch adam, {args.rows:,} streamed rows, batch {args.batch_size}:")
    for ranks in (1,) if args.no_torchrun else (1, 2):
        reports = run_child(big, "adam", args.batch_size, args.epochs, ranks)
        epoch = min(reports[0]["epoch_s"])
        rss = max(r["rss_mib"] for r in reports)
        rate = args.rows / epoch
        print(f"  {ranks} process(es): epoch {epoch:.1f} s ({rate / 1e6:.2f} M rows/s), whole run "
              f"{reports[0]['run_s']:.1f} s, peak RSS {rss:.0f} MiB per process; "
              f"params {_short(reports[0]['params'])}")  # fmt: skip
    print(f"\nLevenberg–Marquardt, {args.lm_rows:,} points:")
    mine = run_child(lm, "lm", 0, 0, 1)[0]
    print(f"  gradfit streamed: {mine['n_iter']} iterations, {mine['run_s']:.1f} s (with the "
          f"statistics' pass), peak RSS {mine['rss_mib']:.0f} MiB, status {mine['status']}, "
          f"params {_short(mine['params'])}")  # fmt: skip
    if not args.no_scipy:
        theirs = scipy_lm(lm)
        if "error" in theirs:
            print(f"  SciPy least_squares (in memory): failed: {theirs['error']}")
        else:
            print(f"  SciPy least_squares (in memory): {theirs['nfev']} evaluations, "
                  f"{theirs['run_s']:.1f} s, peak RSS {theirs['rss_mib']:.0f} MiB, "
                  f"params {_short(theirs['params'])}")  # fmt: skip


def _short(params: dict) -> str:
    return ", ".join(f"{k}={v:.6g}" for k, v in params.items())


if __name__ == "__main__":
    main()
