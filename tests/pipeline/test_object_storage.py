"""Object storage against moto's S3 server (a real HTTP server on a free loopback port): shards read
through fsspec, a subset exported to s3://, transient errors retried, others failing at once in one
line, and no credential in any output or log. Also: the catalog's round-trip edits."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.catalog import Catalog, DatasetEntry
from pipeline.errors import CurateError
from pipeline.shards import iter_shard
from pipeline.storage import StorageError, export_dir, public_options, redact, redact_url, scrub

ENV_SECRET = "envSECRET-9f3c-do-not-leak"
CAT_SECRET = "catSECRET-71ab-do-not-leak"
CAT_KEY = "AKIDCATALOGKEY42"
SEL = "craig-0.1"


class S3Server:
    """moto's S3 app served by werkzeug on 127.0.0.1 (what ThreadedMotoServer runs), behind a WSGI
    layer that records every request and answers the next ones for a (method, path) with injected
    errors: throttling, a 5xx, a denial."""

    def __init__(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        self.requests: list[tuple[str, str, int]] = []
        self.ranges: list[tuple[str, str, int]] = []  # (path, Range header, status) of every GET
        self.faults: dict[tuple[str, str], list[tuple[int, str]]] = {}
        self._lock = threading.Lock()
        app = DomainDispatcherApplication(create_backend_app)

        def layer(environ, start_response):
            key = (environ["REQUEST_METHOD"], environ["PATH_INFO"])
            with self._lock:
                queue = self.faults.get(key)
                fault = queue.pop(0) if queue else None
            if fault:  # None in a queue: that request goes through
                status, code = fault
                self.requests.append((*key, status))
                if key[0] == "GET":
                    self.ranges.append((key[1], environ.get("HTTP_RANGE", ""), status))
                body = b"" if key[0] == "HEAD" else (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>injected {code}</Message><RequestId>t</RequestId></Error>").encode()
                start_response(f"{status} {code}", [("Content-Type", "application/xml"),
                                                    ("Content-Length", str(len(body)))])
                return [body]

            def recorded(status, headers, exc_info=None):
                self.requests.append((*key, int(status.split()[0])))
                if key[0] == "GET":
                    self.ranges.append((key[1], environ.get("HTTP_RANGE", ""), int(status.split()[0])))
                return start_response(status, headers, exc_info)

            return app(environ, recorded)

        self._server = make_server("127.0.0.1", 0, layer, threaded=True, request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def statuses(self, method: str, path: str) -> list[int]:
        return [s for m, p, s in self.requests if (m, p) == (method, path)]

    def stop(self):
        self._server.shutdown()
        self._thread.join()


@pytest.fixture(scope="module")
def s3(tmp_path_factory, digits_catalog):
    """The server with the digits shards uploaded to s3://digits/shards/; fake credentials in the
    environment, a temporary HOME (no ~/.aws), short backoff."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"HOME": str(home), "AWS_ACCESS_KEY_ID": "AKIDENVKEY42", "AWS_SECRET_ACCESS_KEY": ENV_SECRET,
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(home / "none"),
                     "AWS_SHARED_CREDENTIALS_FILE": str(home / "none"), "CURATE_IO_BACKOFF": "0.01"}.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "CURATE_IO_ATTEMPTS"):
            mp.delenv(k, raising=False)
        server = S3Server()
        import fsspec

        fs = fsspec.filesystem("s3", endpoint_url=server.url)
        for bucket in ("digits", "exports"):
            fs.mkdir(bucket)
        for p in sorted((digits_catalog.parent / "shards").iterdir()):
            fs.put_file(str(p), f"digits/shards/{p.name}")
        try:
            yield server
        finally:
            server.stop()


def s3_catalog(path: Path, digits_catalog: Path, options: dict) -> Path:
    """A catalog whose 'digits' entry names the uploaded shards by s3:// URL, written by set_entry."""
    local = Catalog.load(digits_catalog).entry("digits")
    splits = {k: "s3://digits/shards/" + Path(v).name for k, v in local.splits.items()}
    cat = Catalog.load(path, missing_ok=True)
    cat.set_entry("digits", local.model_copy(update={"splits": splits, "storage_options": options}))
    return path


def run_units(r, units):
    for u in units:
        r.run(u)


@pytest.mark.slow  # two proxy-embed runs and craig: ~20 s of CPU, more on a busy machine
def test_flow_reads_s3_exports_to_s3_and_leaks_no_credential(s3, digits_catalog, make_runner, tmp_path,
                                                              capfd, caplog):
    caplog.set_level(logging.DEBUG)
    options = {"endpoint_url": s3.url, "key": CAT_KEY, "secret": CAT_SECRET,
               "config_kwargs": {"retries": {"total_max_attempts": 1}}}  # botocore's own retries off: curate's act
    cat = s3_catalog(tmp_path / "s3cat" / "data_catalog.yaml", digits_catalog, options)
    assert Catalog.load(cat).shards("digits")[0] == "s3://digits/shards/train-000000.tar"
    select, embed = [{"method": "craig", "budget": 0.1}], {"epochs": 1, "num_workers": 0}
    units = ["index", "embed", f"select/{SEL}", f"materialize/{SEL}"]
    local = make_runner(tmp_path / "local", select=select, embed=embed, materialize={"shard_size": 50})
    run_units(local, units)

    shard1 = "/digits/shards/train-000001.tar"
    s3.faults[("GET", shard1)] = [(503, "ServiceUnavailable")] * 2
    export = "s3://exports/curated"
    remote = make_runner(tmp_path / "s3run", catalog=cat, select=select, embed=embed,
                         materialize={"shard_size": 50, "export": export})
    run_units(remote, units)

    # the throttled shard was read after two 503s, retried by curate (botocore's retries are off)
    assert [s // 100 for s in s3.statuses("GET", shard1)[:3]] == [5, 5, 2]
    retries = [r.getMessage() for r in caplog.records if r.name == "curate.storage" and "retrying" in r.getMessage()]
    assert len(retries) == 2 and all("s3://digits/shards/train-000001.tar" in m for m in retries)

    # the export: shards, sizes.json, url.txt, the manifest and curate's marker under <export>/<sel>/
    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=s3.url)
    exported = {p.removeprefix(f"exports/curated/{SEL}/"): fs.cat_file(p) for p in fs.find(f"exports/curated/{SEL}")}
    unit = remote.run_dir / "materialize" / SEL
    local_copy = {str(p.relative_to(unit)): p.read_bytes() for p in unit.rglob("*")
                  if p.is_file() and p.name != "_stage.json"}
    assert exported.pop("_curate_export.json") and exported == local_copy
    assert any(k.startswith("shards/subset-") for k in exported) and "shards/sizes.json" in exported
    put_order = [p for m, p, s in s3.requests if m == "PUT" and p.startswith(f"/exports/curated/{SEL}/")]
    assert put_order[-1] == f"/exports/curated/{SEL}/manifest.parquet"
    assert json.loads((unit / "_stage.json").read_text())["metrics"]["export"]["written"] is True

    # same rows as the local run: every column but where the source shard is (path vs URL)
    got = pq.read_table(fsspec.open(f"s3://exports/curated/{SEL}/manifest.parquet", endpoint_url=s3.url).open())
    want = pq.read_table(local.run_dir / "materialize" / SEL / "manifest.parquet")
    assert got.num_rows == want.num_rows > 100
    assert got.drop(["source_shard"]).to_pylist() == want.drop(["source_shard"]).to_pylist()
    assert [Path(s).name for s in got.column("source_shard").to_pylist()] == \
        [Path(s).name for s in want.column("source_shard").to_pylist()]
    assert got.column("source_shard")[0].as_py().startswith("s3://digits/shards/train-")
    sel_s3 = pq.read_table(remote.run_dir / "select" / SEL / "selection.parquet")
    sel_local = pq.read_table(local.run_dir / "select" / SEL / "selection.parquet")
    assert sel_s3.drop(["shard"]).to_pylist() == sel_local.drop(["shard"]).to_pylist()

    # same seed, same bytes: the selection recomputed from s3 is byte-identical, and the export, already
    # there byte for byte, is left as it is (no PUT)
    before = (remote.run_dir / "select" / SEL / "selection.parquet").read_bytes()
    puts = len([r for r in s3.requests if r[0] == "PUT"])
    remote.run(f"select/{SEL}", force=True)
    remote.run(f"materialize/{SEL}", force=True)
    assert (remote.run_dir / "select" / SEL / "selection.parquet").read_bytes() == before
    assert json.loads((unit / "_stage.json").read_text())["metrics"]["export"]["written"] is False
    assert len([r for r in s3.requests if r[0] == "PUT"]) == puts

    # run.json shows the entry's credentials as ***; nothing anywhere holds a secret or the catalog's key
    rec = json.loads((remote.run_dir / "run.json").read_text())["dataset_entry"]["storage_options"]
    assert rec["secret"] == rec["key"] == "***" and rec["endpoint_url"] == s3.url
    out, err = capfd.readouterr()
    texts = {"stdout": out, "stderr": err, "logs": caplog.text}  # DEBUG records of every logger
    texts.update({str(p): p.read_bytes().decode("latin-1") for p in remote.run_dir.rglob("*") if p.is_file()})
    texts.update({k: v.decode("latin-1") for k, v in exported.items()})
    assert len(texts) > 20
    for name, text in texts.items():
        for secret in (ENV_SECRET, CAT_SECRET):
            assert secret not in text, f"{secret} in {name}"
        if name != "logs":  # botocore's DEBUG records show the (public) key id of its Authorization header
            assert CAT_KEY not in text, name
    assert not [r for r in caplog.records if CAT_KEY in r.getMessage() and not r.name.startswith("botocore")]


def test_throttling_twice_then_success_with_default_options(s3, digits_catalog):
    """The default stack (s3fs and botocore retry throttling too): two SlowDowns, then every sample."""
    path = "/digits/shards/train-000002.tar"
    s3.faults[("GET", path)] = [(503, "SlowDown")] * 2
    got = [(s.key, s.members) for s in iter_shard("s3:/" + path, storage_options={"endpoint_url": s3.url})]
    want = [(s.key, s.members) for s in iter_shard(digits_catalog.parent / "shards" / "train-000002.tar")]
    assert got == want and len(got) > 100
    assert [s // 100 for s in s3.statuses("GET", path)[-3:]] == [5, 5, 2]


def test_read_cut_off_mid_shard_resumes_where_it_was(s3, digits_catalog, caplog):
    """64 KiB range reads; the third fails with a 500 (botocore's retries off): curate reopens the
    object and asks for the bytes from where the stream had reached, not from the start."""
    path = "/digits/shards/train-000000.tar"
    s3.faults[("GET", path)] = [None, None, (500, "InternalError")]
    opts = {"endpoint_url": s3.url, "default_block_size": 2**16,
            "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    first = len(s3.ranges)
    got = [(s.key, s.members) for s in iter_shard("s3:/" + path, storage_options=opts)]
    want = [(s.key, s.members) for s in iter_shard(digits_catalog.parent / "shards" / "train-000000.tar")]
    assert got == want
    gets = [(r, st) for p, r, st in s3.ranges[first:] if p == path]
    assert [st for _, st in gets[:4]] == [206, 206, 500, 206] and len(gets) > 10
    resumed = int(gets[3][0].removeprefix("bytes=").split("-")[0])
    assert 0 < resumed <= int(gets[2][0].removeprefix("bytes=").split("-")[0])
    assert len([r for r in caplog.records if r.name == "curate.storage" and "InternalError" in r.getMessage()]) == 1


def test_transient_errors_give_up_after_the_configured_attempts(s3, monkeypatch):
    monkeypatch.setenv("CURATE_IO_ATTEMPTS", "3")
    path = "/digits/shards/test-000000.tar"
    s3.faults[("GET", path)] = [(500, "InternalError")] * 5
    before = len(s3.statuses("GET", path))
    opts = {"endpoint_url": s3.url, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    with pytest.raises(StorageError) as exc:
        list(iter_shard("s3:/" + path, storage_options=opts))
    msg = str(exc.value)
    assert "\n" not in msg and "s3://digits/shards/test-000000.tar" in msg and "gave up after 3 attempt(s)" in msg
    assert s3.statuses("GET", path)[before:] == [500, 500, 500]
    s3.faults.pop(("GET", path))


@pytest.mark.parametrize("fault, expect", [(None, "no such object"), ((403, "AccessDenied"), "access denied")])
def test_missing_or_denied_fails_at_once_in_one_line(s3, caplog, fault, expect):
    key = f"/digits/elsewhere/{'denied' if fault else 'missing'}-000000.tar"
    if fault:
        fsspec = pytest.importorskip("fsspec")
        fsspec.filesystem("s3", endpoint_url=s3.url).pipe_file("digits" + key.removeprefix("/digits"), b"x" * 1024)
        s3.faults[("HEAD", key)] = [fault]
    with pytest.raises(StorageError) as exc:
        next(iter_shard("s3:/" + key, storage_options={"endpoint_url": s3.url}))
    msg = str(exc.value)
    assert "\n" not in msg and f"s3:/{key}" in msg and expect in msg
    assert ENV_SECRET not in msg
    assert s3.statuses("HEAD", key) == [fault[0] if fault else 404]  # one request: not retried
    assert not [r for r in caplog.records if r.name == "curate.storage"]


def test_catalog_url_splits_checked_and_fingerprinted(s3, digits_catalog, tmp_path):
    import fsspec

    opts = {"endpoint_url": s3.url, "key": CAT_KEY, "secret": CAT_SECRET}
    cat = Catalog.load(s3_catalog(tmp_path / "c.yaml", digits_catalog, opts))
    fp = cat.fingerprint("digits", "train")
    # a rotated secret changes nothing; other bytes in a shard do
    rotated = Catalog.load(s3_catalog(tmp_path / "c2.yaml", digits_catalog, {**opts, "secret": "another-one"}))
    assert rotated.fingerprint("digits", "train") == fp
    fs = fsspec.filesystem("s3", endpoint_url=s3.url)
    fs.copy("digits/shards/train-000000.tar", "digits/moved/train-000000.tar")
    fs.copy("digits/shards/train-000001.tar", "digits/moved/train-000001.tar")
    data = fs.cat_file("digits/shards/train-000002.tar")
    fs.pipe_file("digits/moved/train-000002.tar", data[:600] + bytes(255 - b for b in data[600:700]) + data[700:])
    entry = cat.entry("digits")
    moved = entry.model_copy(update={"splits": {**entry.splits,
                                                "train": "s3://digits/moved/train-{000000..000002}.tar"}})
    cat.set_entry("digits", moved)
    changed = cat.fingerprint("digits", "train")
    fs.pipe_file("digits/moved/train-000002.tar", fs.cat_file("digits/shards/train-000002.tar"))
    assert changed != Catalog.load(cat.path).fingerprint("digits", "train") != fp  # ETag follows the bytes
    # a split naming a missing shard, or a bucket that does not exist: one line naming the first URL
    for train in ("s3://digits/moved/train-{000000..000003}.tar", "s3://no-such-bucket/train-000000.tar"):
        cat.set_entry("digits", moved.model_copy(update={"splits": {**moved.splits, "train": train}}))
        with pytest.raises(CurateError, match=r"points nowhere: 1 of \d shard\(s\) missing, first s3://") as exc:
            Catalog.load(cat.path).shards("digits")
        assert "\n" not in str(exc.value)


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_export_never_replaces_what_curate_did_not_write(s3, tmp_path, kind):
    import fsspec

    opts = {"endpoint_url": s3.url} if kind == "s3" else {}
    dest = "s3://exports/rules/sel" if kind == "s3" else str(tmp_path / "dest" / "sel")
    fs, root = fsspec.core.url_to_fs(dest, **opts)

    def find():
        return sorted(p.removeprefix(root + "/") for p in fs.find(root))

    def put(name, data):
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(f"{root}/{name}", data)

    src = tmp_path / "unit"
    (src / "shards").mkdir(parents=True)
    (src / "shards" / "subset-000000.tar").write_bytes(b"a" * 100)
    (src / "shards" / "subset-000001.tar").write_bytes(b"b" * 100)
    (src / "manifest.parquet").write_bytes(b"manifest-1")
    # a destination holding anything curate did not write is refused, and left as it was
    put("notes.txt", b"someone else's")
    with pytest.raises(StorageError, match="notes.txt, which curate did not write"):
        export_dir(src, dest, opts, owner="/runs/a")
    assert find() == ["notes.txt"]
    fs.rm(root, recursive=True)
    put("manifest.parquet", b"their manifest")
    with pytest.raises(StorageError, match="manifest.parquet, which curate did not write") as exc:
        export_dir(src, dest, opts, owner="/runs/a")
    assert "\n" not in str(exc.value) and fs.cat_file(f"{root}/manifest.parquet") == b"their manifest"
    assert find() == ["manifest.parquet"]
    put("manifest.parquet", b"manifest-1")  # byte-identical: left as it is
    assert export_dir(src, dest, opts, owner="/runs/a")["written"] is False
    assert find() == ["manifest.parquet"]
    fs.rm(root, recursive=True)

    assert export_dir(src, dest, opts, owner="/runs/a")["written"] is True
    assert find() == ["_curate_export.json", "manifest.parquet", "shards/subset-000000.tar", "shards/subset-000001.tar"]
    marker = json.loads(fs.cat_file(f"{root}/_curate_export.json"))
    assert marker["owner"] == "/runs/a" and marker["files"][-1] == "manifest.parquet"
    # the same run again with fewer shards: ours replaced, the stale shard removed, a neighbour kept
    put("README", b"kept")
    (src / "shards" / "subset-000001.tar").unlink()
    (src / "manifest.parquet").write_bytes(b"manifest-2")
    assert export_dir(src, dest, opts, owner="/runs/a")["written"] is True
    assert find() == ["README", "_curate_export.json", "manifest.parquet", "shards/subset-000000.tar"]
    assert fs.cat_file(f"{root}/manifest.parquet") == b"manifest-2" and fs.cat_file(f"{root}/README") == b"kept"
    # another run's export is refused unless identical
    (src / "manifest.parquet").write_bytes(b"manifest-3")
    with pytest.raises(StorageError, match="holds the export of run /runs/a"):
        export_dir(src, dest, opts, owner="/runs/b")
    assert fs.cat_file(f"{root}/manifest.parquet") == b"manifest-2"


def test_credentials_redacted_everywhere_they_could_be_recorded():
    opts = {"endpoint_url": "https://user:pw123456@minio.local:9000", "key": "AKID", "secret": "s3cr3t-value",
            "profile": "dev", "client_kwargs": {"aws_session_token": "tok-123456", "region_name": "eu-west-1"},
            "headers": {"Authorization": "Bearer abcdef"}}
    red = redact(opts)
    assert red == {"endpoint_url": "https://user:***@minio.local:9000", "key": "***", "secret": "***",
                   "profile": "dev", "client_kwargs": {"aws_session_token": "***", "region_name": "eu-west-1"},
                   "headers": {"Authorization": "***"}}
    assert public_options(opts) == {"endpoint_url": "https://user:***@minio.local:9000", "profile": "dev",
                                    "client_kwargs": {"region_name": "eu-west-1"}, "headers": {}}
    assert redact_url("https://h/o?X-Amz-Signature=abc&x=1") == "https://h/o?X-Amz-Signature=***&x=1"
    assert scrub("failed with s3cr3t-value and tok-123456", opts) == "failed with *** and ***"
    entry = DatasetEntry(splits={"train": "s3://b/t-000000.tar"}, storage_options=opts)
    assert entry.model_dump()["storage_options"] == red and "s3cr3t" not in repr(entry)
    assert entry.model_dump(context={"credentials": True})["storage_options"] == opts
    assert "storage_options" not in DatasetEntry(splits={"train": "x.tar"}).model_dump()


def test_set_entry_keeps_comments_and_layout(tmp_path):
    text = """\
# my datasets: this comment stays
datasets:
    zeta:   # the z one
        description: "quoted"
        splits:
            train: shards/train-{000000..000002}.tar   # three shards
            test: shards/test-000000.tar
        fields:
            image: [png, jpg]
            label: cls
        num_classes: 10

    # alpha second, on purpose
    alpha:
        splits:
            train: a/train-000000.tar
        fields:
            image:
              - png
"""
    path = tmp_path / "data_catalog.yaml"
    path.write_text(text)
    cat = Catalog.load(path)
    cat.set_entry("zeta", cat.entry("zeta").model_copy(update={"num_classes": 9}))
    assert path.read_text() == text.replace("num_classes: 10", "num_classes: 9")
    cat.set_entry("beta", DatasetEntry(splits={"train": "s3://b/p/t-{000000..000001}.tar"},
                                       storage_options={"endpoint_url": "http://127.0.0.1:9"}))
    new = path.read_text()
    assert new.startswith(text.replace("num_classes: 10", "num_classes: 9"))
    assert ("    beta:\n        description: ''\n        splits:\n"
            "            train: s3://b/p/t-{000000..000001}.tar\n") in new
    assert "            image:\n              - png\n" in new.split("beta:")[1]
    again = Catalog.load(path)
    assert list(again.entries) == ["zeta", "alpha", "beta"]
    assert again.entry("beta").storage_options == {"endpoint_url": "http://127.0.0.1:9"}
    assert again.entry("zeta").fields.image == ["png", "jpg"] and again.entry("zeta").num_classes == 9
