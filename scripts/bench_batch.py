"""Benchmark ``convert_batch``: reused local workers, a Dask LocalCluster, memory over 100 conversions.

* 40 tiny SavedModels (Conv2D -> ReLU -> Dense on 16x16x3, random weights),
  ``jobs=2``: total wall time against the target
  (sum of per-model conversion times) / 2 + 2 x (one worker's start-up) + 10 %;
* the same 40 on a 2-worker ``dask.distributed.LocalCluster`` (processes,
  one thread each): target within 1.5x of the local run;
* models/min and per-model overhead for both: (workers x wall time - sum of
  conversion times) / models, the worker time per model not spent converting
  (local: also without the workers' start-up; the Dask target reuses the
  local worker start-up, Dask workers import TensorFlow on their first model);
* memory: one batch of 100 conversions with ``jobs=2``; the parent's resident
  memory before and after, each worker's after its first and its last models.

Usage: python scripts/bench_batch.py [--models 40] [--memory-models 100] [--no-dask]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def make_models(root: Path, n: int) -> None:
    import keras
    import numpy as np

    inp = keras.Input((16, 16, 3), name="x")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inp)
    x = keras.layers.ReLU(name="relu")(x)
    out = keras.layers.Dense(4, name="dense")(keras.layers.Flatten(name="flat")(x))
    model = keras.Model(inp, out)
    rng = np.random.RandomState(0)
    for i in range(n):
        model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
        model.export(str(root / f"m{i:03d}"), verbose=False)


def figures(name: str, report, wall: float, workers: int, startup: float, count_startup: bool = True) -> None:
    n = len(report.models)
    conv = sum(r["seconds"] for r in report.models.values())
    target = (conv / workers + workers * startup) * 1.10
    print(f"[{name}] {report.count('converted')}/{n} converted, {report.count('failed')} failed")
    print(f"[{name}] total wall time            {wall:8.2f} s")
    print(f"[{name}] sum of conversion times    {conv:8.2f} s  (mean {conv / n:.3f} s per model)")
    print(f"[{name}] one worker's start-up      {startup:8.2f} s")
    print(f"[{name}] target sum/{workers} + {workers}x start-up + 10% {target:8.2f} s  -> {'met' if wall <= target else 'MISSED'}")
    print(f"[{name}] models/min                 {n / wall * 60:8.1f}")
    print(f"[{name}] per-model overhead         {(workers * wall - conv) / n:8.3f} s  ((workers x wall - sum) / models)")
    if count_startup:
        print(f"[{name}]   without worker start-up  {(workers * wall - conv - workers * startup) / n:8.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=40)
    ap.add_argument("--memory-models", type=int, default=100)
    ap.add_argument("--no-dask", action="store_true", help="skip the LocalCluster run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from graphquant.batch import _rss_mb, convert_batch

    tmp = Path(tempfile.mkdtemp(prefix="bench_batch-"))
    try:
        src = tmp / "src"
        t = time.perf_counter()
        make_models(src, args.models)
        print(f"{args.models} SavedModels written in {time.perf_counter() - t:.1f} s")

        t = time.perf_counter()
        local = convert_batch(src, tmp / "out-local", bits=8, jobs=2, progress=False)
        wall_local = time.perf_counter() - t
        startup = local.to_dict()["worker_startup_seconds"]
        figures("local -j 2", local, wall_local, 2, startup)
        print(f"[local -j 2] workers started            {local.to_dict()['workers_started']}")

        if not args.no_dask:
            from distributed import Client, LocalCluster

            t = time.perf_counter()
            with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0") as cluster, \
                    Client(cluster) as client:
                t_batch = time.perf_counter()
                dask = convert_batch(src, tmp / "out-dask", bits=8, client=client, progress=False)
                wall_batch = time.perf_counter() - t_batch
            wall_dask = time.perf_counter() - t
            figures("dask 2 workers", dask, wall_batch, 2, startup, count_startup=False)
            print(f"[dask 2 workers] wall incl. cluster start and stop {wall_dask:.2f} s")
            print(f"[dask 2 workers] / local: {wall_batch / wall_local:.2f}x (batch), "
                  f"{wall_dask / wall_local:.2f}x (with cluster start/stop); target <= 1.5x")

        # memory: one batch of --memory-models conversions on two reused workers
        mem = tmp / "src-mem"
        models = sorted(src.iterdir())
        for i in range(args.memory_models):
            shutil.copytree(models[i % len(models)], mem / f"m{i:03d}")
        parent_before = _rss_mb()
        t = time.perf_counter()
        r = convert_batch(mem, tmp / "out-mem", bits=8, jobs=2, progress=False)
        wall = time.perf_counter() - t
        parent_after = _rss_mb()
        print(f"[memory] {r.count('converted')}/{args.memory_models} converted in {wall:.1f} s "
              f"({r.to_dict()['workers_started']} workers)")
        print(f"[memory] parent resident memory {parent_before:.0f} MB before, {parent_after:.0f} MB after")
        per_worker = {}
        for rec in r.models.values():  # records are in model order; each worker's in the order it converted them
            per_worker.setdefault(rec["worker"], []).append(rec["rss_mb"])
        for pid, rss in per_worker.items():
            print(f"[memory] worker {pid}: {len(rss)} models, resident {rss[0]:.0f} MB after its first, "
                  f"{max(rss):.0f} MB at most, {rss[-1]:.0f} MB after its last")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
