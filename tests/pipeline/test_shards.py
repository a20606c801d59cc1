import io
import tarfile

import numpy as np
import pytest

from pipeline.errors import ShardError
from pipeline.shards import ShardWriter, check_safe, decode_image, encode_png, expand_braces, iter_shard


def test_expand_braces_ranges_and_lists():
    assert expand_braces("a-{000000..000002}.tar") == ["a-000000.tar", "a-000001.tar", "a-000002.tar"]
    assert expand_braces("{x,y}/s-{8..10}.tar") == ["x/s-8.tar", "x/s-9.tar", "x/s-10.tar",
                                                    "y/s-8.tar", "y/s-9.tar", "y/s-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def _write(tmp_path, n=5, shard_size=2):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (n, 6, 7), dtype=np.uint8)
    with ShardWriter(tmp_path, "train", shard_size) as w:
        for i in range(n):
            w.write(f"k{i}", {"png": encode_png(imgs[i]), "cls": str(i % 3).encode()})
    return imgs


def test_roundtrip_sizes_and_deterministic_bytes(tmp_path):
    imgs = _write(tmp_path / "a")
    _write(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
    assert (tmp_path / "a" / "sizes.json").read_text().count(":") == 3
    samples = [s for n in names for s in iter_shard(tmp_path / "a" / n)]
    assert [s.key for s in samples] == [f"k{i}" for i in range(5)]
    assert [s.offset for s in samples] == [0, 1, 0, 1, 0]
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(decode_image(s.members["png"], "png"), imgs[i])


def test_webdataset_library_reads_our_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    imgs = _write(tmp_path, n=3, shard_size=10)
    ds = wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False).decode("l")
    got = list(ds)
    assert [g["__key__"] for g in got] == ["k0", "k1", "k2"]
    np.testing.assert_array_equal((np.asarray(got[1]["png"]) * 255).round().astype(np.uint8)
                                  if np.asarray(got[1]["png"]).dtype != np.uint8 else np.asarray(got[1]["png"]), imgs[1])


def test_truncated_tar_names_shard_and_last_sample(tmp_path):
    _write(tmp_path, n=4, shard_size=10)
    p = tmp_path / "train-000000.tar"
    with tarfile.open(p) as tf:
        member = tf.getmember("k2.png")
    p.write_bytes(p.read_bytes()[: member.offset_data + member.size // 2])  # cut inside k2's image
    with pytest.raises(ShardError, match=r"train-000000.tar: truncated or corrupt tar \(at sample 'k2'\)"):
        list(iter_shard(p))


def test_pickle_member_refused_without_unpickling(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("a.png", encode_png(np.zeros((4, 4), np.uint8))), ("a.pyd", pickle.dumps(Evil()))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tar").write_bytes(buf.getvalue())
    (sample,) = list(iter_shard(tmp_path / "s.tar"))
    with pytest.raises(ShardError, match="pickle member.*never unpickles"):
        check_safe(sample, "s.tar")
    assert not marker.exists()


def test_writer_rejects_dotted_and_repeated_keys(tmp_path):
    w = ShardWriter(tmp_path, "x")
    with pytest.raises(ShardError, match="no dots"):
        w.write("a.b", {"cls": b"1"})
    w.write("a", {"cls": b"1"})
    with pytest.raises(ShardError, match="twice"):
        w.write("a", {"cls": b"1"})


def test_undecodable_image_names_sample():
    with pytest.raises(ShardError, match=r"sample 'z': image member .png does not decode"):
        decode_image(b"not a png", "png", where="sample 'z'")


def test_long_keys_roundtrip(tmp_path):
    key = "k" * 150
    with ShardWriter(tmp_path, "t") as w:
        w.write(key, {"cls": b"3"})
    (s,) = list(iter_shard(tmp_path / "t-000000.tar"))
    assert s.key == key and s.members == {"cls": b"3"}
