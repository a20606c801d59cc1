"""`curate inspect`: the contact sheet shows the samples it should, and the per-class tables count
what the run's Parquet files hold (recounted here with pyarrow and numpy, not polars)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.contact_sheet import KEPT
from pipeline.errors import CurateError
from pipeline.inspect import inspect_unit, spread
from pipeline.manifest import write_parquet
from pipeline.runner import Runner

from tests.helpers import FMNIST, REPO, fast_config

K = 3  # samples per class and side


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_catalog):
    """A real digits run: index, proxy embed, el2n, a difficulty and a stratified selection, a
    tiny distilled set."""
    cfg = load_config(fast_config(tmp_path_factory.mktemp("inspect") / "run", score={"methods": ["el2n"]},
                                  select=[{"method": "difficulty", "budget": 0.3, "score": "el2n"},
                                          {"method": "stratified", "budget": 0.2}],
                                  distill=[{"method": "dm", "ipc": 2, "iterations": 2, "batch_real": 64,
                                            "width": 8}]))
    r = Runner(cfg, Catalog.load(digits_catalog))
    r.write_run_json()
    for unit in ("index", "embed", "score", "select/difficulty-0.3", "select/stratified-0.2", "distill/dm-ipc2"):
        r.run(unit)
    return r


def table_of(r, rel: str) -> dict[str, np.ndarray]:
    t = pq.read_table(r.run_dir / rel)
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}


def per_class(table, label: int):
    """The row of `label` in an inspection table, as a dict."""
    return next(r for r in table.iter_rows(named=True) if r["class"] == str(label))


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scores_sheet_shows_the_lowest_and_highest_per_class(run, tmp_path):
    res = inspect_unit(run.run_dir, "score", tmp_path / "s.png", per_class=K)
    idx, sc = table_of(run, "index/index.parquet"), table_of(run, "score/scores.parquet")
    score = dict(zip(sc["row"], sc["score_el2n"]))
    want = []
    for c in range(10):
        rows = sorted((r for r, lab in zip(idx["row"], idx["label"]) if lab == c), key=lambda r: (score[r], r))
        want += rows[:K] + rows[-K:]
        t = per_class(res.table, c)
        vals = np.array([score[r] for r in rows])
        assert t["rows"] == len(rows) and t["not_finite"] == 0
        assert t["min"] == pytest.approx(vals.min()) and t["max"] == pytest.approx(vals.max())
    assert res.drawn_rows == want
    assert per_class(res.table, "all")["rows"] == len(idx["row"])
    assert is_png(tmp_path / "s.png")
    with pytest.raises(CurateError, match=r"score: no score 'forgetting' \(have: el2n\)"):
        inspect_unit(run.run_dir, "score", score="forgetting")


def test_difficulty_sheet_marks_kept_and_counts_per_class(run, tmp_path):
    res = inspect_unit(run.run_dir, "select/difficulty-0.3", tmp_path / "d.png", per_class=K)
    sel, sc = table_of(run, "select/difficulty-0.3/selection.parquet"), table_of(run, "score/scores.parquet")
    score = dict(zip(sc["row"], sc["score_el2n"]))
    kept = dict(zip(sel["row"], sel["selected"]))
    want = []
    for c in range(10):
        rows = sorted((r for r, lab in zip(sel["row"], sel["label"]) if lab == c), key=lambda r: (score[r], r))
        want += rows[:K] + rows[-K:]
        t = per_class(res.table, c)
        assert (t["rows"], t["kept"]) == (len(rows), sum(kept[r] for r in rows))
    assert res.drawn_rows == want
    assert all((t.color == KEPT) == kept[t.row] for t in res.drawn)  # kept ones are marked kept
    assert per_class(res.table, "all")["kept"] == sel["selected"].sum() == round(0.3 * len(sel["row"]))


def test_selection_sheet_shows_first_picks_and_dropped(run, tmp_path):
    res = inspect_unit(run.run_dir, "select/stratified-0.2", tmp_path / "st.png", per_class=K)
    sel = table_of(run, "select/stratified-0.2/selection.parquet")
    drawn = iter(res.drawn)
    for c in range(10):
        mine = sel["label"] == c
        first = sel["row"][mine & sel["selected"]][np.argsort(sel["rank"][mine & sel["selected"]])][:K]
        tiles = [next(drawn) for _ in range(2 * K)]
        assert [t.row for t in tiles[:K]] == list(first)
        assert all(not sel["selected"][t.row] and sel["label"][t.row] == c for t in tiles[K:])
        t = per_class(res.table, c)
        assert (t["rows"], t["kept"]) == (mine.sum(), (mine & sel["selected"]).sum())
        assert t["weight_min"] == t["weight_max"] == 1.0
    assert next(drawn, None) is None
    # a materialize unit is shown as its selection
    run.run("materialize/stratified-0.2")
    assert inspect_unit(run.run_dir, "materialize/stratified-0.2").table.equals(res.table)


def _plant_dedup(r, name: str) -> list[tuple[int, int, float]]:
    """A dedup selection written as the select stage writes one (index columns, selection columns,
    dup_of, dup_similarity) with six removed rows and their twins; one twin is of another class."""
    index = pq.read_table(r.run_dir / "index" / "index.parquet")
    labels = index.column("label").to_numpy()
    n = index.num_rows
    other = int(np.flatnonzero(labels != labels[11])[0])
    planted = [(5, 4, 0.999), (17, 16, 0.9995), (300, 2, 0.991), (301, 3, 0.97), (900, 899, 0.985), (11, other, 0.96)]
    selected = np.ones(n, bool)
    dup_of = np.full(n, -1, np.int64)
    sim = np.full(n, np.nan, np.float32)
    for removed, twin, s in planted:
        selected[removed], dup_of[removed], sim[removed] = False, twin, s
    rank = np.full(n, -1, np.int32)
    rank[selected] = np.arange(selected.sum())
    t = index
    for col, arr in [("selected", pa.array(selected)), ("weight", pa.array(np.ones(n, np.float32))),
                     ("rank", pa.array(rank, mask=rank < 0)), ("method", pa.array(["dedup"] * n)),
                     ("budget", pa.array(np.full(n, selected.mean()))),
                     ("dup_of", pa.array(dup_of, mask=dup_of < 0)), ("dup_similarity", pa.array(sim, mask=dup_of < 0))]:
        t = t.append_column(col, arr)
    d = r.run_dir / "select" / name
    d.mkdir(parents=True)
    write_parquet(t, d / "selection.parquet", stage="select", stage_version=3, fingerprint="0" * 64)
    (d / "_stage.json").write_text(json.dumps({"stage": "select", "unit": f"select/{name}",
                                               "config": {"method": "dedup", "eps": 0.05}}))
    return planted


def test_dedup_sheet_pairs_removed_with_twins(run, tmp_path):
    planted = _plant_dedup(run, "dedup-planted")
    by_sim = sorted(planted, key=lambda p: (p[2], p[0]))
    res = inspect_unit(run.run_dir, "select/dedup-planted", tmp_path / "dd.png", pairs=24)
    assert res.drawn_rows == [x for removed, twin, _ in by_sim for x in (removed, twin)]
    assert "other class!" in res.drawn[res.drawn_rows.index(11) + 1].text
    few = inspect_unit(run.run_dir, "select/dedup-planted", tmp_path / "d4.png", pairs=4)
    picked = [by_sim[i] for i in spread(len(by_sim), 4)]  # lowest, highest and two between
    assert few.drawn_rows == [x for removed, twin, _ in picked for x in (removed, twin)]
    assert picked[0] == by_sim[0] and picked[-1] == by_sim[-1] and len(picked) == 4
    labels = pq.read_table(run.run_dir / "index" / "index.parquet").column("label").to_numpy()
    for c in range(10):
        mine = [p for p in planted if labels[p[0]] == c]
        t = per_class(res.table, c)
        assert (t["rows"], t["removed"], t["kept"]) == ((labels == c).sum(), len(mine), (labels == c).sum() - len(mine))
        assert t["twin_other_class"] == sum(labels[tw] != c for _, tw, _ in mine)
        if mine:
            assert t["sim_min"] == pytest.approx(min(s for *_, s in mine)) and \
                t["sim_max"] == pytest.approx(max(s for *_, s in mine))
    assert per_class(res.table, "all")["removed"] == len(planted)


@pytest.fixture(scope="module")
def planted_dedup(tmp_path_factory, digits_catalog):
    """Digits where 20 samples of the first shard are replaced by near-copies (+-1 grey level, same
    label) of 20 earlier ones, deduplicated by the default dedup (content features)."""
    import io
    import shutil

    from PIL import Image

    from pipeline.shards import iter_shard
    from tests.helpers import rewrite_shard

    root = tmp_path_factory.mktemp("planted")
    shutil.copytree(digits_catalog.parent, root / "cat")
    shard = sorted((root / "cat" / "shards").glob("train-*.tar"))[0]
    members = {s.key: s.members for s in iter_shard(shard)}
    keys = sorted(members)
    rng = np.random.default_rng(0)
    copies = {}
    for original, copy in zip(keys[:20], keys[200:220]):
        img = np.asarray(Image.open(io.BytesIO(members[original]["png"]))).astype(np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img + rng.integers(-1, 2, img.shape), 0, 255).astype(np.uint8)).save(buf, format="png")
        copies[copy] = (original, {"png": buf.getvalue(), "cls": members[original]["cls"]})
    rewrite_shard(shard, lambda key, m: (key, {**m, **copies[key][1]} if key in copies else m))
    r = Runner(load_config(fast_config(root / "run", select=[{"method": "dedup"}])),
               Catalog.load(root / "cat" / "data_catalog.yaml"))
    r.write_run_json()
    (unit,) = r.units("select")
    for u in ("index", unit):
        r.run(u)
    return r, unit, {c: o for c, (o, _) in copies.items()}


def test_dedup_sheet_of_a_real_run_shows_the_planted_copies(planted_dedup, tmp_path):
    r, unit, copies = planted_dedup
    res = inspect_unit(r.run_dir, unit, tmp_path / "real.png", pairs=len(copies) + 10)
    sel = table_of(r, f"{unit}/selection.parquet")
    key = dict(zip(sel["row"], sel["key"]))
    shown = {key[a]: key[b] for a, b in zip(res.drawn_rows[::2], res.drawn_rows[1::2])}
    assert {c: shown.get(c) for c in copies} == copies  # every planted copy, beside its original
    removed = ~sel["selected"] & ~np.isnan(sel["dup_similarity"].astype(float))
    assert len(shown) == removed.sum()  # and every other removal too (there is room for all)
    sims = [sel["dup_similarity"][a] for a in res.drawn_rows[::2]]
    assert sims == sorted(sims)  # from the lowest similarity to the highest
    for c in range(10):
        t = per_class(res.table, c)
        mine = sel["label"] == c
        assert (t["rows"], t["kept"], t["removed"]) == (mine.sum(), (mine & sel["selected"]).sum(),
                                                       (mine & removed).sum())
        assert t["twin_other_class"] == 0  # the copies kept their originals' labels


def test_distilled_sheet_shows_every_synthetic_image(run, tmp_path):
    from pipeline.data import read_distilled

    res = inspect_unit(run.run_dir, "distill/dm-ipc2", tmp_path / "dm.png")
    images, labels = read_distilled(run.run_dir / "distill" / "dm-ipc2")
    assert len(res.drawn) == len(images) == 20 and res.drawn_rows == [None] * 20
    for tile, img in zip(res.drawn, images[np.argsort(labels, kind="stable")]):
        np.testing.assert_array_equal(tile.image, img.transpose(1, 2, 0))
    counts = np.bincount(pq.read_table(run.run_dir / "distill" / "dm-ipc2" / "manifest.parquet")
                         .column("label").to_numpy())
    assert [per_class(res.table, c)["images"] for c in range(10)] == counts.tolist() == [2] * 10


def test_units_without_a_view_and_missing_units_are_one_line_errors(run):
    with pytest.raises(CurateError, match=r"'embed' is a embed unit"):
        inspect_unit(run.run_dir, "embed")
    with pytest.raises(CurateError, match=r"no finished unit 'select/nope' \(units here: .*select/stratified-0.2"):
        inspect_unit(run.run_dir, "select/nope")


def test_cli_prints_the_table_and_writes_the_sheet(run, tmp_path):
    out = tmp_path / "sheet.png"
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", "--run", str(run.run_dir),
                          "select/stratified-0.2", "--out", str(out), "--per-class", "2"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[1].split()[:3] == ["class", "rows", "kept"]
    sel = table_of(run, "select/stratified-0.2/selection.parquet")
    row0 = lines[2].split()
    assert row0[:3] == ["0", str((sel["label"] == 0).sum()), str((sel["selected"] & (sel["label"] == 0)).sum())]
    assert lines[-1] == f"contact sheet: {out} (40 images)" and is_png(out)


def test_stages_and_the_cli_import_without_polars():
    code = ("import sys\nsys.modules['polars'] = None\n"
            "import stages.registry, pipeline.cli, pipeline.method_list, pipeline.clean\nprint('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_caption_selection_without_embeddings_is_shown_by_row(run, tmp_path):
    """Pairs of a selection whose run has no caption embeddings: kept and dropped per class,
    spread over the rows, each with its caption."""
    sel = pq.read_table(run.run_dir / "select" / "stratified-0.2" / "selection.parquet")
    labels = sel.column("label").to_numpy()
    captions = [f"a photo of the digit {lab}" if r % 7 else None for r, lab in enumerate(labels)]
    sel = sel.set_column(sel.column_names.index("caption"), "caption", pa.array(captions, pa.string()))
    d = run.run_dir / "select" / "pairs-planted"
    d.mkdir()
    write_parquet(sel, d / "selection.parquet", stage="select", stage_version=3, fingerprint="0" * 64)
    (d / "_stage.json").write_text(json.dumps({"stage": "select", "unit": "select/pairs-planted",
                                               "config": {"method": "clipscore", "budget": 0.2}}))
    res = inspect_unit(run.run_dir, "select/pairs-planted", tmp_path / "pp.png", per_class=K)
    assert res.view == "pairs" and "cosine_kept_median" not in res.table.columns
    selected = sel.column("selected").to_numpy()
    drawn = iter(res.drawn)
    for c in range(10):
        for part in (selected & (labels == c), ~selected & (labels == c)):
            tiles = [next(drawn) for _ in range(K)]
            rows = np.flatnonzero(part)
            assert tiles[0].row == rows[0] and tiles[-1].row == rows[-1] and all(part[t.row] for t in tiles)
            assert all((captions[t.row] or "(no caption)") in t.text for t in tiles)
    assert next(drawn, None) is None


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="needs ../shared/datasets/fashion-mnist")
def test_caption_selection_shows_kept_and_dropped_pairs(tmp_path):
    """Real image-caption pairs (Fashion-MNIST, 30% wrong captions), a tiny proxy CLIP, clipscore."""
    from pipeline.ingest import ingest

    cat = tmp_path / "cat.yaml"
    ingest("fmnist-pairs", tmp_path / "shards", "fmnist-pairs", src=str(FMNIST), catalog=str(cat), noise=0.3,
           seed=0, train_size=300)
    tiny = {"embed_dim": 16, "vision_layers": 1, "vision_width": 32, "patch": 7, "text_layers": 1,
            "text_width": 32, "context": 12, "epochs": 1, "batch_size": 64}
    cfg = load_config({"run": str(tmp_path / "run"), "dataset": "fmnist-pairs",
                       "embed": {"method": "proxy_clip", "clip": tiny, "views": 1},
                       "select": [{"method": "clipscore", "budget": 0.3}], "verify": {"recipe": "clip"}})
    r = Runner(cfg, Catalog.load(cat))
    r.write_run_json()
    for unit in ("index", "embed", "select/clipscore-0.3"):
        r.run(unit)
    res = inspect_unit(r.run_dir, "select/clipscore-0.3", tmp_path / "p.png", per_class=2)
    assert res.view == "pairs"
    sel = table_of(r, "select/clipscore-0.3/selection.parquet")
    emb = np.load(r.run_dir / "embed" / "embeddings.npy").astype(np.float32)
    txt = np.load(r.run_dir / "embed" / "text_embeddings.npy").astype(np.float32)
    cos = (emb * txt).sum(1)
    drawn = iter(res.drawn)
    for c in range(10):
        mine = sel["label"] == c
        n_kept, n_dropped = (min(2, (mine & sel["selected"]).sum()), min(2, (mine & ~sel["selected"]).sum()))
        tiles = [next(drawn) for _ in range(n_kept + n_dropped)]
        for t, kept in zip(tiles, [True] * n_kept + [False] * n_dropped):
            assert sel["selected"][t.row] == kept and sel["label"][t.row] == c
            assert sel["caption"][t.row] in t.text
        for part, shown in ((mine & sel["selected"], tiles[:n_kept]), (mine & ~sel["selected"], tiles[n_kept:])):
            if part.sum() >= 2:  # spread over the cosine: its lowest and its highest
                assert [cos[t.row] for t in shown] == pytest.approx([cos[part].min(), cos[part].max()], abs=1e-3)
        tab = per_class(res.table, c)
        assert (tab["rows"], tab["kept"]) == (mine.sum(), (mine & sel["selected"]).sum())
    assert next(drawn, None) is None and sel["selected"].sum() == 90
    assert is_png(tmp_path / "p.png")
