"""open_clip embed method on a small image folder with captions (random or local weights)."""

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")

MODEL = "ViT-S-32"  # the smallest ViT config open_clip ships; same code path as ViT-B-32


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    from PIL import Image

    from pipeline.ingest import ingest

    root = tmp_path_factory.mktemp("pets")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 2)):
        for c, cls in enumerate(("cat", "dog")):
            d = root / "src" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
                (d / f"{i}.txt").write_text(f"a photo of a {cls} number {i}")
    ingest("imagefolder", root / "shards", "pets", str(root / "src"), catalog=str(root / "cat.yaml"))
    return root


def run_embed(root, run_dir, pretrained=None, shard_groups=1):
    from pipeline.catalog import Catalog
    from pipeline.config import load_config
    from pipeline.runner import Runner

    cfg = load_config({"run": str(run_dir), "dataset": "pets",
                       "embed": {"method": "open_clip", "model": MODEL, "pretrained": pretrained,
                                 "batch_size": 8, "num_workers": 2, "shard_groups": shard_groups}})
    r = Runner(cfg, Catalog.load(root / "cat.yaml"))
    r.write_run_json()
    for unit in ["index", *r.units("embed_part"), "embed"]:
        r.run(unit)
    return r


def test_embeddings_equal_direct_forward_from_local_checkpoint(pets, tmp_path):
    from stages.embed.open_clip import _Preprocessed

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    ckpt = tmp_path / "clip.pt"
    torch.save(model.state_dict(), ckpt)
    r = run_embed(pets, tmp_path / "run", pretrained=str(ckpt))
    emb = np.load(r.run_dir / "embed" / "embeddings.npy")
    assert emb.dtype == np.float16 and emb.shape == (24, 384)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)

    from pipeline.data import ManifestDataset

    ds = ManifestDataset(r.run_dir / "index" / "index.parquet", transform=_Preprocessed(preprocess))
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.eval().encode_image(torch.stack([ds[i]["image"] for i in range(24)])), dim=-1)
    np.testing.assert_allclose(emb.astype(np.float32), ref.numpy(), atol=2e-3)

    txt = np.load(r.run_dir / "embed" / "text_embeddings.npy")
    captions = [f"a photo of a {cls} number {i}" for cls in ("cat", "dog")
                for i in sorted(range(12), key=str)]  # files in name order: 0, 1, 10, 11, 2, ...
    with torch.no_grad():
        ref_txt = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer(MODEL)(captions)), dim=-1)
    np.testing.assert_allclose(txt.astype(np.float32), ref_txt.numpy(), atol=2e-3)  # row i = caption of image i
    # a local checkpoint and the same in-memory weights give the same bytes on rerun
    again = run_embed(pets, tmp_path / "run2", pretrained=str(ckpt))
    assert (again.run_dir / "embed" / "embeddings.npy").read_bytes() == (r.run_dir / "embed" / "embeddings.npy").read_bytes()


def test_missing_checkpoint_is_one_line_error(pets, tmp_path):
    from pipeline.errors import CurateError

    with pytest.raises(CurateError, match="embed open_clip: cannot load model 'ViT-S-32'"):
        run_embed(pets, tmp_path / "run", pretrained=str(tmp_path / "nope.pt"))


def test_shard_groups_split_the_work_and_merge_in_row_order(pets, tmp_path):
    import pyarrow.parquet as pq

    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    whole = run_embed(pets, tmp_path / "one", pretrained=str(tmp_path / "clip.pt"))
    split = run_embed(pets, tmp_path / "three", pretrained=str(tmp_path / "clip.pt"), shard_groups=3)
    assert split.units("embed_part") == ["embed_part/000", "embed_part/001", "embed_part/002"]
    keys = [pq.read_table(tmp_path / "three" / "embed_part" / f"{g:03d}" / "rows.parquet").column("key").to_pylist()
            for g in range(3)]
    assert [len(k) for k in keys] == [8, 8, 8]
    assert sum(keys, []) == pq.read_table(tmp_path / "three" / "index" / "index.parquet").column("key").to_pylist()
    for name in ("embeddings.npy", "text_embeddings.npy"):
        a, b = (np.load(d / "embed" / name).astype(np.float32) for d in (tmp_path / "one", tmp_path / "three"))
        np.testing.assert_allclose(a, b, atol=2e-3)
    assert split.state("embed") == "done"
