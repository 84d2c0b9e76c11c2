"""Data beyond memory: an image folder of 50,000 JPEGs decoded once into a cache file, trained from it.

Run in pieces (each well under 10 minutes on a 2-core host; under the shared CPU lock):

    python benchmarks/data_scale.py generate          # 50,000 JPEGs, 10 classes, ~320x240 (in /tmp, never committed)
    python benchmarks/data_scale.py decode --workers 1
    python benchmarks/data_scale.py decode            # one process per core
    python benchmarks/data_scale.py ready             # a second run: the cache is hit
    python benchmarks/data_scale.py rss               # peak RSS of `edgekd build --until teacher` training at 128 px
    python benchmarks/data_scale.py throughput        # training img/s read from the cache file vs from memory

Each piece appends one JSON line to ``benchmarks/_work/data_scale.jsonl``; ``report`` writes
``benchmarks/data_scale_results.md`` from them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

ROOT = Path(os.environ.get("EDGEKD_SCALE_ROOT", "/tmp/edgekd-data-scale"))
FOLDER, CACHE = ROOT / "images", ROOT / "cache"
LOG = Path(__file__).resolve().parent / "_work" / "data_scale.jsonl"
SIZE = 128
EDGEKD = str(Path(sys.executable).parent / "edgekd")
READER = "preadv per batch"  # how edgekd.data.store reads the cache; before commit 1973da4 it was a memory map


def record(piece: str, **values) -> None:
    LOG.parent.mkdir(parents=True, exist_ok=True)
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), [])
    host = f"{machine()}; CPU flags: " + ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni") if f in flags)
    row = {"piece": piece, "host": host, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), **values}
    with open(LOG, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def _write_chunk(job: tuple[int, int, int]) -> None:
    from PIL import Image

    start, stop, seed = job
    rng = np.random.default_rng(seed)
    for i in range(start, stop):
        w, h = int(rng.integers(256, 385)), int(rng.integers(192, 289))
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # a smooth picture plus grain: JPEG-sized like a photo, not like noise
        im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        grain = rng.integers(-12, 13, (h, w, 3))
        arr = np.clip(np.asarray(im, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        folder = FOLDER / f"class{i % 10}"
        Image.fromarray(arr).save(folder / f"{i:06d}.jpg", quality=85)


def generate(n: int) -> None:
    from concurrent.futures import ProcessPoolExecutor

    for c in range(10):
        (FOLDER / f"class{c}").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    jobs = [(s, min(n, s + 1000), s) for s in range(0, n, 1000)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_chunk, jobs))
    files = list(FOLDER.rglob("*.jpg"))
    record("generate", images=len(files), bytes=sum(p.stat().st_size for p in files), seconds=round(time.time() - t0, 1))


def _load(workers: int | None):
    from edgekd.data import load_dataset
    from edgekd.data.store import Storage

    return load_dataset("imagefolder", str(FOLDER), store_size=Storage(SIZE, "crop", str(CACHE), workers))


def decode(workers: int | None) -> None:
    import edgekd.data  # noqa: F401 - the interpreter's imports (torch) are not part of the data's time

    shutil.rmtree(CACHE, ignore_errors=True)
    t0 = time.time()
    ds = _load(workers)
    wall = time.time() - t0
    record("decode", workers=workers or len(os.sched_getaffinity(0)), seconds=round(wall, 2), images=len(ds.train) + len(ds.val) + len(ds.test),
           cache=ds.info["cache"]["cache"], array_bytes=Path(ds.info["cache"]["cache_file"]).stat().st_size, max_rss_mb=_rss_mb())


def ready() -> None:
    import edgekd.data  # noqa: F401 - as in decode: imports are not the data's time

    t0 = time.time()
    ds = _load(None)
    record("ready", seconds=round(time.time() - t0, 3), cache=ds.info["cache"]["cache"], max_rss_mb=_rss_mb())


def _rss_mb(children: bool = False) -> float:
    return round(resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss(seconds: int, batch: int, train_subset: int | None) -> None:
    """A build's teacher stage on the 50,000 images at 128 px (or their first ``train_subset``), stopped by a
    time limit; peak RSS of that process. The same command on a subset shows what the data set adds."""
    out = ROOT / "run"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [EDGEKD, "build", "--dataset", "imagefolder", "--data-root", str(FOLDER), "--until", "teacher", "--out", str(out), "--no-control",
           "--set", "teacher.model=nano_cnn", "--set", "teacher.pretrained=none", "--set", f"teacher.input_size={SIZE}",
           "--set", "teacher.train.epochs=1", "--set", f"teacher.train.time_limit_s={seconds}", "--set", f"data.cache_dir={CACHE}",
           "--set", "data.test_subset=2000", "--set", f"teacher.train.batch_size={batch}", "--json"]  # training sees all 36,000 training images; validation and test 2,000 each
    if train_subset:
        cmd += ["--set", f"data.train_subset={train_subset}"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "EDGEKD_QUIET": "1"})
    if proc.returncode != 0:
        sys.exit(proc.stderr[-2000:])
    teacher = json.loads((out / "manifest.json").read_text())["stages"]["teacher"]["metrics"]
    record("rss", seconds=round(time.time() - t0, 1), peak_rss_mb=_rss_mb(children=True), command_run=" ".join(cmd[1:]), metrics=teacher, reader=READER,
           images_per_second=round(teacher["plan"]["steps"] * teacher["plan"]["batch_size"] / teacher["train_seconds"], 1))


def throughput(steps: int, rounds: int) -> None:
    """Training steps of nano_cnn at 128 px fed from the cache file (read per batch) and from the same images in RAM, alternated."""
    import torch
    import torch.nn.functional as F

    from edgekd.data import Split, iterate
    from edgekd.models import create_student

    torch.manual_seed(0)
    ds = _load(None)
    from_cache = ds.train
    in_memory = Split(from_cache.images, from_cache.labels)  # the same training images copied into RAM (36,000 x 3 x 128 x 128 uint8 = 1.8 GB)
    model = create_student("nano_cnn", ds.num_classes, 3, SIZE)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def run(split: Split, epoch: int) -> float:
        model.train()
        t0, n = time.time(), 0
        for k, batch in enumerate(iterate(split, 64, shuffle=True, seed=0, epoch=epoch, augment="crop-flip")):
            if k == steps:
                break
            loss = F.cross_entropy(model(model.preprocess(batch.images)), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(batch.labels)
        return n / (time.time() - t0)

    run(from_cache, 99)  # warm-up
    rates: dict[str, list[float]] = {"cache": [], "memory": []}
    for r in range(rounds):
        for name, split in (("cache", from_cache), ("memory", in_memory)) if r % 2 == 0 else (("memory", in_memory), ("cache", from_cache)):
            rates[name].append(run(split, r))
    med = {k: statistics.median(v) for k, v in rates.items()}
    record("throughput", steps=steps, rounds=rounds, img_s=rates, median_cache=round(med["cache"], 1), median_memory=round(med["memory"], 1),
           ratio=round(med["cache"] / med["memory"], 4), torch_threads=torch.get_num_threads())


def _what_the_data_adds(rows: list[dict]) -> str:
    """The full-data RSS run against the latest one on a training subset at the same batch: what the data set itself costs."""
    rss = [r for r in rows if r["piece"] == "rss" and r.get("reader") == READER]
    batch = lambda r: r["metrics"]["plan"]["batch_size"]  # noqa: E731
    full = [r for r in rss if "data.train_subset=" not in r["command_run"]]
    for f in reversed(full):
        sub = [r for r in rss if "data.train_subset=" in r["command_run"] and batch(r) == batch(f)]
        if sub:
            d = f["peak_rss_mb"] - sub[-1]["peak_rss_mb"]
            return (f"At batch {batch(f)}, training on all 36,000 images peaks {d:+.0f} MB against the same build on a subset "
                    f"({sub[-1]['peak_rss_mb']:.0f} MB): that difference is what the data set adds; the rest is the build's own "
                    "(torch, the model's activations kept for the backward pass, the test split in RAM).")
    return "No subset run at the same batch yet: what the data set adds is not separated from the build's own memory."


def report() -> None:
    """benchmarks/data_scale_results.md from the latest line of each piece."""
    rows = [json.loads(line) for line in LOG.read_text().splitlines()]
    last: dict[str, dict] = {}
    for r in rows:
        last[r["piece"] + (str(r.get("workers")) if r["piece"] == "decode" else "")] = r
    gen = last["generate"]
    decodes = [r for r in rows if r["piece"] == "decode"]
    d1 = next(r for r in decodes if r["workers"] == 1)  # the first pair: both with the JPEGs in the page cache, the same code
    dn = next(r for r in decodes if r["workers"] > 1)
    latest_n = [r for r in decodes if r["workers"] > 1][-1]
    full = [r for r in rows if r["piece"] == "rss" and "data.train_subset=" not in r["command_run"]]
    ready_row, rss_row, tp = last["ready"], (full[-1] if full else None), last.get("throughput")
    lines = [
        "# Data beyond memory: 50,000 JPEGs decoded once (benchmarks/data_scale.py)", "",
        f"Host: {dn['host']}.", "",
        f"Data: {gen['images']:,} generated JPEGs, 10 classes, 256-384 x 192-288 px (around 320x240), quality 85, "
        f"{gen['bytes'] / 1e6:.0f} MB, in {ROOT} (not committed). Stored at {SIZE} px, `data.resize=crop`: "
        f"{d1['array_bytes'] / 1e9:.2f} GB uint8 array.", "",
        "| measure | result | goal |", "|---|---|---|",
        f"| first decode, 1 process (`{d1['command']}`) | {d1['seconds']:.1f} s ({d1['images'] / d1['seconds']:.0f} img/s) | |",
        f"| first decode, {dn['workers']} processes (`{dn['command']}`) | {dn['seconds']:.1f} s ({dn['images'] / dn['seconds']:.0f} img/s), "
        f"{d1['seconds'] / dn['seconds']:.2f}x faster | one process per core |",
        f"| second run, data ready (`{ready_row['command']}`, cache {ready_row['cache']}) | {ready_row['seconds']:.2f} s = "
        f"{100 * ready_row['seconds'] / latest_n['seconds']:.2f}% of the latest parallel first decode ({latest_n['seconds']:.1f} s) | < 5% |",
        (f"| peak RSS of `edgekd build --until teacher` training on the 50,000 images at {SIZE} px, batch {rss_row['metrics']['plan']['batch_size']} "
         f"| {rss_row['peak_rss_mb']:.0f} MB (array {d1['array_bytes'] / 1e6:.0f} MB){'' if rss_row['peak_rss_mb'] < 2048 else ': **goal missed**'} | < 2 GB |") if rss_row else "| peak RSS of a build training | not measured (see below) | < 2 GB |",
        (f"| training throughput, cache file vs in RAM (`{tp['command']}`) | {tp['median_cache']:.0f} vs {tp['median_memory']:.0f} img/s: "
         f"ratio {tp['ratio']:.3f} | within 5% |") if tp else "| training throughput, cache file vs RAM | not measured (see below) | within 5% |", "",
        (f"RSS run: `edgekd {rss_row['command_run']}` (its teacher stage stopped: {rss_row['metrics'].get('stopped')}, "
         f"{rss_row['images_per_second']} img/s training; the labels are random, so top-1 is chance).") if rss_row else "RSS: the piece did not run in time.", "",
        (f"Throughput: nano_cnn at {SIZE} px, batch 64, crop-flip augmentation, {tp['steps']} steps per measurement, "
         f"{tp['rounds']} rounds alternating the order, median; all rates (img/s): {json.dumps(tp['img_s'])}.") if tp else "Throughput: the piece did not run in time.", "",
        "Every RSS run, in order (peak RSS; how the cache was read; teacher batch; training images): " + "; ".join(
            f"{r['peak_rss_mb']:.0f} MB ({r.get('reader', 'memory map')}, batch {r['metrics']['plan']['batch_size']}, "
            f"{'data.train_subset=' + r['command_run'].split('data.train_subset=')[1].split()[0] if 'data.train_subset=' in r['command_run'] else 'all 36,000'})"
            for r in rows if r["piece"] == "rss") + ". " + _what_the_data_adds(rows), "",
        "Every decode run, in order (seconds; the JPEGs' page-cache state differed: the first 1-process run came right after they were "
        "written, the second after other jobs had evicted 836 MB of them): "
        + ", ".join(f"{r['workers']} process(es) {r['seconds']:.1f}" for r in rows if r["piece"] == "decode") + ". The parallel runs before "
        "commit 'Cache hit in 1/30' also counted torch's import (~1.5 s) and listed the folder twice as slowly; data-ready runs: "
        + ", ".join(f"{r['seconds']:.2f}" for r in rows if r["piece"] == "ready") + " s.", "",
        "Each row of the table is the latest run of its piece in benchmarks/_work/data_scale.jsonl (not committed); every piece ran under the "
        "shared CPU lock (no other benchmark or test at the same time).",
    ]
    out = Path(__file__).resolve().parent / "data_scale_results.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("piece", choices=["generate", "decode", "ready", "rss", "throughput", "report"])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seconds", type=int, default=90)
    ap.add_argument("--batch", type=int, default=64, help="rss: the teacher's batch size (its activations are most of a training step's memory)")
    ap.add_argument("--train-subset", type=int, default=None, help="rss: train on the first N images only (what the data set adds)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    {"generate": lambda: generate(a.n), "decode": lambda: decode(a.workers), "ready": ready, "rss": lambda: rss(a.seconds, a.batch, a.train_subset),
     "throughput": lambda: throughput(a.steps, a.rounds), "report": report}[a.piece]()


if __name__ == "__main__":
    main()
