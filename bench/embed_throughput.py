"""open_clip embed throughput from shards vs the raw model forward, in one run.

Writes N synthetic 224 px JPEG samples into WebDataset shards, then times
(a) the embed stage's kernel (shards -> DataLoader workers decode + preprocess ->
model, bf16 on CUDA) and (b) the same model's forward on tensors already on the
device. Prints both in img/s and their ratio (goal on an H100: >= 0.8), and the
knn_shapley time for a train x test size. Needs no pydantic/prefect/polars, so it
runs on the GPU machine with open_clip carried along.

    python bench/embed_throughput.py --n 20000 --batch 1024 --workers 14 --knn 60000x10000   # H100
    python bench/embed_throughput.py --n 128 --batch 32 --workers 2 --knn 60000x2000          # 2-core CPU
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402

from pipeline.manifest import COMMON_SCHEMA, write_parquet  # noqa: E402
from pipeline.shards import ShardWriter  # noqa: E402


def write_jpeg_shards(out: Path, n: int, size: int = 224) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    rows = {k: [] for k in COMMON_SCHEMA.names}
    with ShardWriter(out, "train", 5000) as w:
        for i in range(n):
            img = np.roll(base, i, axis=1)  # distinct images, realistic JPEG sizes
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            shard, off = w.write(f"s{i:08d}", {"jpg": buf.getvalue(), "cls": b"0"})
            for k, v in (("row", i), ("uid", f"bench/s{i:08d}"), ("key", f"s{i:08d}"), ("shard", str(out / shard)),
                         ("offset", off), ("label", 0), ("caption", None)):
                rows[k].append(v)
    path = out / "index.parquet"
    write_parquet(pa.table(rows, schema=COMMON_SCHEMA), path, stage="bench", stage_version=1, fingerprint="-")
    return path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--knn", default="60000x2000")
    a = p.parse_args()
    from stages.embed.open_clip import encode_images, load_clip
    from stages.kernels.scores.knn_shapley import knn_shapley

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else os.cpu_count()} "
          f"{'' if dev.type == 'cuda' else 'cores'}), torch {torch.__version__}, model {a.model} (random weights)")
    model, preprocess, _ = load_clip(a.model, None, dev)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_jpeg_shards(Path(tmp), a.n)
        encode_images(model, preprocess, manifest, device=dev, batch_size=a.batch, num_workers=a.workers)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        emb = encode_images(model, preprocess, manifest, device=dev, batch_size=a.batch, num_workers=a.workers)
        stage_s = time.perf_counter() - t0
    x = torch.randn(a.batch, 3, 224, 224, device=dev)
    steps = max(1, a.n // a.batch)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        model.encode_image(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            model.encode_image(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        raw_s = time.perf_counter() - t0
    stage_ips, raw_ips = len(emb) / stage_s, steps * a.batch / raw_s
    print(f"embed from shards: {stage_ips:,.1f} img/s ({len(emb)} images, {a.workers} workers, batch {a.batch})")
    print(f"raw forward on device tensors: {raw_ips:,.1f} img/s")
    print(f"ratio shards/raw: {stage_ips / raw_ips:.2f}")
    n, m = (int(v) for v in a.knn.split("x"))
    rng = np.random.default_rng(0)
    tx, qx = rng.normal(size=(n, 128)).astype(np.float32), rng.normal(size=(m, 128)).astype(np.float32)
    if dev.type == "cuda":
        knn_shapley(tx[:1000], np.zeros(1000, int), qx[:10], np.zeros(10, int), device=dev)
    t0 = time.perf_counter()
    knn_shapley(tx, rng.integers(0, 10, n), qx, rng.integers(0, 10, m), k=10, device=dev)
    print(f"knn_shapley {n} x {m} (128-d, K=10): {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
