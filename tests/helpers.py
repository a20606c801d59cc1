"""Helpers the tests share (fixtures live in conftest.py): paths, fast configs, planted damage."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path(os.environ.get("CURATE_FMNIST", REPO.parent / "shared" / "datasets" / "fashion-mnist"))
PAIRS_NOISE, PAIRS_SEED, PAIRS_N = 0.3, 0, 1000  # fmnist-pairs: 1,000 train pairs, 30% of captions name a wrong class
CURATE = [sys.executable, "-m", "pipeline.cli"]


def curate(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, as a user runs it."""
    return subprocess.run([*CURATE, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def one_line_error(res) -> str:
    """The CLI failed with exit 1 and exactly one `error: ...` line on stderr (no traceback)."""
    assert res.returncode == 1, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def load_bench(name: str):
    """bench/<name>.py as a module: its real-process helpers (servers, clusters) that tests share."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fast_config(run_dir: Path, **sections) -> dict:
    cfg = {
        "run": str(run_dir), "dataset": "digits", "seed": 0,
        "embed": {"epochs": 1},
        "select": [{"method": "random", "budget": 0.1}, {"method": "stratified", "budget": 0.2}],
        "verify": {"epochs": 1, "seeds": 1, "batch_size": 32, "lr": 0.05, "width": 32, "ipc_epochs": 3},
    }
    cfg.update(sections)
    return cfg


def files_under(d: Path) -> dict[str, bytes]:
    """relative path -> bytes for every file except _stage.json (which holds times)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != "_stage.json"}


def digits_split(upscale: int = 1):
    """sklearn's digits as uint8 [N, 1, 8u, 8u] (nearest-neighbour upscaled u times) and labels,
    split 1400 train / 397 held out by one fixed permutation."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * 16).clip(0, 255).astype(np.uint8)[:, None]
    x = x.repeat(upscale, axis=2).repeat(upscale, axis=3)
    perm = np.random.default_rng(0).permutation(len(d.target))
    return x[perm[:1400]], d.target[perm[:1400]], x[perm[1400:]], d.target[perm[1400:]]


def rerecord(unit_dir: Path) -> None:
    """Make `_stage.json` claim the files now in `unit_dir`, as if the stage itself had written
    them: how a test plants bad output (NaN rows, a foreign buffer) that the run store would
    otherwise see as tampered, hence stale."""
    import json

    from pipeline.runner import STAGE_FILE, describe_outputs, hash_outputs

    rec = json.loads((unit_dir / STAGE_FILE).read_text())
    rec["outputs"] = describe_outputs(unit_dir)
    rec["output_hash"] = hash_outputs(rec["outputs"])
    (unit_dir / STAGE_FILE).write_text(json.dumps(rec))


def rewrite_shard(path: Path, edit) -> None:
    """Rewrite a shard with `edit(key, members) -> (key, members)` applied to every sample."""
    from pipeline.shards import iter_shard

    samples = list(iter_shard(path))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for s in samples:
            key, members = edit(s.key, dict(s.members))
            for ext, data in sorted(members.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def plant_label_noise(catalog: Path, dest: Path, rate: float = 0.1, seed: int = 0) -> tuple[Path, set[str]]:
    """A copy of the catalog folder of `catalog` in `dest` whose training labels are moved to another
    class with probability `rate` (seeded): (the copy's catalog, the keys flipped)."""
    import shutil

    import numpy as np

    shutil.copytree(catalog.parent, dest)
    rng = np.random.default_rng(seed)
    flipped = set()
    for shard in sorted((dest / "shards").glob("train-*.tar")):
        def edit(key, members):
            if rng.random() < rate:
                flipped.add(key)
                members["cls"] = str((int(members["cls"]) + 1 + rng.integers(9)) % 10).encode()
            return key, members
        rewrite_shard(shard, edit)
    return dest / catalog.name, flipped
