"""Scale benchmark: the whole curation path on N generated image-caption samples with
precomputed embeddings, each unit in its own process; prints wall seconds and peak RSS per unit
and in total, and dedup's recall on the planted near-copies.

    python bench/scale.py --n 100000 --d 512 [--device cpu] [--parts P] [--keep DIR]

Writes, in a temporary folder (or --keep DIR): N samples as WebDataset shards (an 8x8 PNG,
label of 10 classes, a caption naming the class, wrong for 30% of samples), of which 2% are
planted near-copies of an earlier sample (the same image; an embedding at cosine ~0.999 to its
original); image and caption embeddings as Parquet (`key`, fixed-size list `embedding`,
float32) around one direction per class. Then, through curate's Runner (`curate stage`'s code
path, one process per unit so each unit's figures are its own): index -> embed precomputed ->
select dedup (features: embeddings), craig 10% (embeddings, sparse graph), clipcov 10% ->
materialize of craig's and clipcov's selections. Figures come from each unit's _stage.json
(wall_seconds, cpu_seconds, peak_rss_bytes). Generating the data is not counted. `--parts P` runs
craig and clipcov as P select_part units each (what a cluster spreads; here one after another).
With --keep DIR, a second call on the same DIR and --n reuses the generated data (the run is redone).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = ["airplane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
COPY_RATE, WRONG_RATE = 0.02, 0.3
SHARD, CHUNK = 10_000, 65_536
VARIANTS = 64  # distinct encoded images per class (encoding N PNGs would dominate generation)


def generate(root: Path, n: int, d: int, seed: int = 0) -> dict:
    """Shards, embeddings and a catalog under root; returns the planted (copy, original) pairs."""
    from pipeline.catalog import Catalog, DatasetEntry, Fields
    from pipeline.ingest import RawSample, write_split
    from pipeline.shards import encode_png, shard_pattern

    rng = np.random.default_rng(seed)
    label = rng.integers(0, 10, n)
    copies = np.sort(rng.choice(np.arange(1, n), int(COPY_RATE * n), replace=False))
    original = np.array([rng.integers(0, c) for c in copies], np.int64)
    original = np.where(np.isin(original, copies), 0, original)  # a copy of a copy: copy sample 0 instead
    src = np.arange(n)
    src[copies] = original
    label[copies] = label[original]
    wrong = rng.random(n) < WRONG_RATE
    said = np.where(wrong, (label + rng.integers(1, 10, n)) % 10, label)
    base = rng.integers(0, 256, (10, 8, 8, 3))
    pngs = [[encode_png(np.clip(base[c] + rng.integers(-40, 41, (8, 8, 3)), 0, 255).astype(np.uint8))
             for _ in range(VARIANTS)] for c in range(10)]
    keys = [f"s{i:08d}" for i in range(n)]

    def samples():
        for i in range(n):
            j = src[i]
            yield RawSample(label=int(label[i]), data=pngs[label[i]][j % VARIANTS], ext="png",
                            caption=f"a photo of a {CLASSES[said[i]]}", key=keys[i])

    sizes = write_split(samples(), root / "shards", "train", SHARD)
    cat = Catalog.load(root / "data_catalog.yaml", missing_ok=True)
    cat.set_entry("scale", DatasetEntry(splits={"train": f"shards/{shard_pattern('train', len(sizes))}"},
                                        num_classes=10, class_names=CLASSES,
                                        fields=Fields(image=["png"], label="cls", caption="txt")))
    mu = rng.standard_normal((10, d)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    kinds = {"image": mu, "text": mu}  # captions embed near the class they name
    writers = {k: pq.ParquetWriter(root / f"{k}_emb.parquet", pa.schema(
        [("key", pa.string()), ("embedding", pa.list_(pa.float32(), d))])) for k in kinds}
    last = {}  # the image embeddings of the chunk so far, for copies of rows in the same chunk
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        for kind, centers in kinds.items():
            cls = label[s:e] if kind == "image" else said[s:e]
            x = centers[cls] + rng.standard_normal((e - s, d)).astype(np.float32) / np.sqrt(d)
            if kind == "image":
                for i in np.flatnonzero((copies >= s) & (copies < e)):
                    c, o = copies[i], original[i]
                    ref = x[o - s] if o >= s else last[o]
                    x[c - s] = ref + 0.05 * rng.standard_normal(d).astype(np.float32) / np.sqrt(d)
                last.update({int(o): x[o - s].copy() for o in original if s <= o < e})
            x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
            emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)
            writers[kind].write_table(pa.table({"key": keys[s:e], "embedding": emb}))
    for w in writers.values():
        w.close()
    np.savez(root / "planted.npz", copies=copies, original=original)
    return {"copies": copies, "original": original, "keys": keys}


def reuse(root: Path, n: int) -> dict | None:
    """The planted pairs of data generated before in root for the same n, else None."""
    path = root / "planted.npz"
    if not path.exists() or not (root / "data_catalog.yaml").exists():
        return None
    with np.load(path) as z:
        copies, original = z["copies"], z["original"]
    if int(round(len(copies) / COPY_RATE)) != n:
        return None
    return {"copies": copies, "original": original, "keys": [f"s{i:08d}" for i in range(n)]}


def run_unit(run: Path, catalog: Path, unit: str) -> None:
    code = ("import sys; from pipeline.runner import Runner; "
            "r = Runner.from_run_dir(sys.argv[1], None, [], sys.argv[2]); r.run(sys.argv[3])")
    res = subprocess.run([sys.executable, "-c", code, str(run), str(catalog), unit], cwd=REPO,
                         capture_output=True, text=True)
    if res.returncode:
        lines = (res.stderr or res.stdout).strip().splitlines()
        raise SystemExit(f"{unit} failed: {lines[-1] if lines else res.returncode}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--device", default="cpu", help="select's device (cpu, or cuda where there is one)")
    ap.add_argument("--parts", type=int, default=1, help="craig and clipcov as this many select_part units each")
    ap.add_argument("--keep", default=None, help="generate and run in this folder and keep it")
    a = ap.parse_args()

    from pipeline.catalog import Catalog
    from pipeline.config import load_config
    from pipeline.runner import Runner

    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="curate-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        planted = reuse(root, a.n) if a.keep else None
        if planted is None:
            planted = generate(root, a.n, a.d)
            print(f"generated {a.n:,} samples x {a.d} in {time.perf_counter() - t0:.0f} s (not counted)", flush=True)
        else:
            print(f"reusing the {a.n:,} samples generated in {root}", flush=True)
        shutil.rmtree(root / "run", ignore_errors=True)
        parts = {"parts": a.parts} if a.parts > 1 else {}
        dev = {"device": a.device}
        cfg = load_config({"run": str(root / "run"), "dataset": "scale", "seed": 0,
                           "embed": {"method": "precomputed", "path": str(root / "image_emb.parquet"),
                                     "text_path": str(root / "text_emb.parquet")},
                           "select": [{"method": "dedup", "features": "embeddings", **dev},
                                      {"method": "craig", "budget": 0.1, "features": "embeddings", "graph": "sparse",
                                       **parts},
                                      {"method": "clipcov", "budget": 0.1, **parts}],
                           "materialize": {"register_entry": False}})
        catalog = root / "data_catalog.yaml"
        runner = Runner(cfg, Catalog.load(catalog))
        runner.write_run_json()
        units = ["index", *runner.units("embed"), *runner.units("select_part"), *runner.units("select"),
                 *[u for u in runner.units("materialize") if "dedup" not in u]]
        print(f"{'unit':<34}{'wall s':>9}{'cpu s':>9}{'peak RSS MiB':>14}", flush=True)
        total_wall, peak = 0.0, 0
        for unit in units:
            run_unit(root / "run", catalog, unit)
            rec = json.loads((root / "run" / unit / "_stage.json").read_text())
            wall, rss = rec["wall_seconds"], rec["peak_rss_bytes"]
            total_wall, peak = total_wall + wall, max(peak, rss)
            print(f"{unit:<34}{wall:>9.1f}{rec['cpu_seconds']:>9.1f}{rss / 2**20:>14.0f}", flush=True)
        print(f"{'total':<34}{total_wall:>9.1f}{'':>9}{peak / 2**20:>14.0f}")
        (dedup,) = [u for u in runner.units("select") if "dedup" in u]
        sel = pq.read_table(root / "run" / dedup / "selection.parquet", columns=["key", "selected"])
        removed = dict(zip(sel.column("key").to_pylist(), (not s for s in sel.column("selected").to_pylist())))
        keys = planted["keys"]
        found = sum(removed[keys[c]] or removed[keys[o]] for c, o in zip(planted["copies"], planted["original"]))
        pairs = {keys[i] for i in np.concatenate([planted["copies"], planted["original"]])}
        others = sum(r for k, r in removed.items() if k not in pairs)
        print(f"dedup: {found:,} of {len(planted['copies']):,} planted near-copy pairs found "
              f"(recall {found / len(planted['copies']):.3f}); {others:,} other samples removed")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
