"""The download stage against a real HTTP server on 127.0.0.1: img2dataset runs for real.

Budget: three img2dataset runs (about 7 s each with one process) in the
module-scoped `downloaded` fixture and the resume test; everything else is
in-process and fast.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline import download, manifest as manifest_mod
from pipeline.serve_images import NOT_AN_IMAGE, serve_folder
from pipeline.sources import (
    EMPTY_CAPTION, INVALID_URL, MALFORMED_ROW, MISSING_URL, NOT_UTF8, SourceRows,
)
from tests.fixtures.http_images import CLIENT_TIMEOUT, IMAGES, make_images

REPO = Path(__file__).resolve().parents[1]
PER_SHARD = 8
ENV = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")


def run_cli(module: str, *args, timeout: int = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def download_cli(tsv: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return run_cli("pipeline.download", "--source", "cc3m", "--input", tsv, "--output", out,
                   "--processes", 1, "--threads", 8, "--timeout", CLIENT_TIMEOUT, "--retries", 0,
                   "--samples-per-shard", PER_SHARD, *extra)


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


# --------------------------------------------------------------------------- the server
def test_server_routes(image_server):
    base = image_server.base_url
    with urllib.request.urlopen(f"{base}/img00.jpg") as r:
        assert Image.open(io.BytesIO(r.read())).size == IMAGES[0][1:]
    with urllib.request.urlopen(f"{base}/noai/img01.jpg") as r:
        assert r.headers["X-Robots-Tag"] == "noai"
    with urllib.request.urlopen(f"{base}/notimage/x.jpg") as r:
        assert r.read() == NOT_AN_IMAGE
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base}/404/img00.jpg")
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{base}/../../etc/passwd")
    with pytest.raises(OSError, match="timed out"):
        urllib.request.urlopen(f"{base}/slow/img00.jpg", timeout=0.3)
    assert image_server.hits["/404/img00.jpg"] == 1


def test_serve_folder_yields_base_url(tmp_path):
    make_images(tmp_path)
    with serve_folder(tmp_path) as url:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}/pic.png") as r:
            assert r.headers["Content-Type"] == "image/png"


# --------------------------------------------------------------------------- adapters
def rows_of(source, path, **kw):
    reader = SourceRows(source, path, **kw)
    rows = list(reader)
    assert reader.rows_read == len(rows) + sum(reader.rejects.values())
    return rows, reader.rejects


def test_cc3m_and_cc12m_tsv(tmp_path):
    cc3m = tmp_path / "cc3m.tsv"
    cc3m.write_bytes(b"a dog\thttp://x/1.jpg\n"
                     b"\thttp://x/2.jpg\n"            # empty caption
                     b"a cat\t\n"                       # missing url
                     b"a cow\tftp://x/3.jpg\n"          # not http(s)
                     b"no tab here\n"                   # malformed
                     b"caf\xe9\thttp://x/4.jpg\n"       # latin-1, not UTF-8
                     b"  spaced  \t http://x/5.jpg \r\n")
    rows, rejects = rows_of("cc3m", cc3m)
    assert rows == [("http://x/1.jpg", "a dog", "cc3m"), ("http://x/5.jpg", "spaced", "cc3m")]
    assert rejects == {EMPTY_CAPTION: 1, MISSING_URL: 1, INVALID_URL: 1, MALFORMED_ROW: 1, NOT_UTF8: 1}

    cc12m = tmp_path / "cc12m.tsv"
    cc12m.write_text("http://x/1.jpg\ta <PERSON> skiing\nhttp://x/2.jpg\t \n")
    rows, rejects = rows_of("cc12m", cc12m)
    assert rows == [("http://x/1.jpg", "a <PERSON> skiing", "cc12m")]
    assert rejects == {EMPTY_CAPTION: 1}


def test_sbu_both_formats(tmp_path):
    official = tmp_path / "sbu-captions-all.json"
    official.write_text(json.dumps({"image_urls": ["http://x/1.jpg", "", "http://x/3.jpg"],
                                    "captions": ["one", "two", "three", "orphan caption"],
                                    "user_ids": ["u1", "u2", "u3"]}))
    rows, rejects = rows_of("sbu", official)
    assert rows == [("http://x/1.jpg", "one", "sbu"), ("http://x/3.jpg", "three", "sbu")]
    assert rejects == {MISSING_URL: 2}

    records = tmp_path / "sbu.json"
    records.write_text(json.dumps([{"url": "http://x/1.jpg", "caption": "one"},
                                   {"image_urls": ["http://x/2.jpg"], "captions": "two"},
                                   {"image": "http://x/3.jpg", "caption": ""},
                                   "not a record"]))
    rows, rejects = rows_of("sbu", records)
    assert rows == [("http://x/1.jpg", "one", "sbu"), ("http://x/2.jpg", "two", "sbu")]
    assert rejects == {EMPTY_CAPTION: 1, MALFORMED_ROW: 1}

    (tmp_path / "bad.json").write_text("{\"image_urls\": [")
    with pytest.raises(ValueError, match="not valid JSON"):
        list(SourceRows("sbu", tmp_path / "bad.json"))


def test_albef_annotation_json(tmp_path):
    ann = tmp_path / "coco.json"
    ann.write_text(json.dumps([
        {"image": "train2014/a.jpg", "caption": ["first", "second", ""]},
        {"image": "/abs/b.jpg", "caption": "third"},
        {"image": "http://x/c.jpg", "caption": "fourth"},
        {"image": "s3://bucket/d.jpg", "caption": "fifth"},
        {"caption": "no image"},
        {"image": "e.jpg", "caption": []},
    ]))
    rows, rejects = rows_of("vg", ann, image_root=tmp_path / "root")
    root = str(tmp_path / "root")
    assert rows == [(f"{root}/train2014/a.jpg", "first", "vg"), (f"{root}/train2014/a.jpg", "second", "vg"),
                    ("/abs/b.jpg", "third", "vg"), ("http://x/c.jpg", "fourth", "vg")]
    assert rejects == {EMPTY_CAPTION: 2, INVALID_URL: 1, MISSING_URL: 1}
    with pytest.raises(ValueError, match="unknown source"):
        SourceRows("laion", ann)


# --------------------------------------------------------------------------- download
def cc3m_list(base: str) -> tuple[list[str], Counter]:
    """21 rows: 14 good images (JPEGs above and below 384 px, a PNG), a 404, a timeout,
    not an image, noai, and three rows the adapter rejects; with the reasons they end under."""
    good = [f"{name.split('.')[0]} caption\t{base}/{name}" for name, _, _ in IMAGES[:13]]
    lines = good[:5] + [
        f"gone\t{base}/404/img00.jpg",
        f"slow\t{base}/slow/img01.jpg",
        f"text\t{base}/notimage/x.jpg",
        f"opt out\t{base}/noai/img02.jpg",
        f"\t{base}/img03.jpg",
        "no url\t",
        "a line without a tab",
    ] + good[5:] + [f"png caption\t{base}/pic.png"]
    expected = Counter({"success": 14, "http_404": 1, "timeout": 1, "not_an_image": 1,
                        "x_robots_tag": 1, "rejected:empty_caption": 1,
                        "rejected:missing_url": 1, "rejected:malformed_row": 1})
    return lines, expected


@pytest.fixture(scope="module")
def downloaded(image_server, tmp_path_factory):
    """Slice 1/2 then slice 0/2 of a 21-row CC3M list (18 accepted rows, 3 shards)."""
    start = Counter(image_server.hits)
    tmp = tmp_path_factory.mktemp("download")
    lines, expected = cc3m_list(image_server.base_url)
    tsv = tmp / "cc3m.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    out = tmp / "shards"
    second = download_cli(tsv, out, "--slice", "1/2")
    assert second.returncode == 0, second.stderr
    after_second = json.loads((out / "manifest.json").read_text())
    first = download_cli(tsv, out, "--url-list-slice", "0/2")
    assert first.returncode == 0, first.stderr
    return {"tsv": tsv, "out": out, "expected": expected, "after_second": after_second,
            "lines": lines, "hits": Counter(image_server.hits) - start, "stderr": first.stderr}


@pytest.mark.timeout(120)
def test_every_row_accounted_for(downloaded):
    m = json.loads((downloaded["out"] / "manifest.json").read_text())
    assert m["complete"] and m["accounted"]
    assert Counter(m["reasons"]) == downloaded["expected"]
    assert m["rows"] == {"input": 21, "rejected_by_adapter": 3, "in_finished_shards": 18,
                         "in_unfinished_shards": 0}
    assert m["outcomes"]["success"] == m["total_samples"] == 14
    assert list(m["shards"]) == ["00000.tar", "00001.tar", "00002.tar"]
    assert sum(m["shards"].values()) == 14
    assert m["source"] == "cc3m" and m["settings"]["image_size"] == 384
    # the manifest matches the tars, and every served URL was fetched exactly once
    for name, n in m["shards"].items():
        assert len(tar_samples(downloaded["out"] / name)) == n
    accepted = [line.split("\t") for line in downloaded["lines"]]
    accepted = [url for caption, url in (f for f in accepted if len(f) == 2) if caption and url]
    assert downloaded["hits"] == Counter("/" + url.split("/", 3)[3] for url in accepted)


def test_run_prints_counts_by_reason(downloaded):
    """Not only a total: every reason with its count, on stderr (stdout's last line stays JSON)."""
    lines = downloaded["stderr"].splitlines()
    for reason, count in downloaded["expected"].items():
        assert any(line.split()[:2] == [reason, str(count)] for line in lines), (reason, downloaded["stderr"])


def test_slice_alone_reports_unfinished_shards(downloaded):
    m = downloaded["after_second"]  # only slice 1/2 (shards 1 and 2) had run
    assert not m["complete"] and m["accounted"]
    assert m["unfinished_shards"] == ["00000.tar"]
    assert list(m["shards"]) == ["00001.tar", "00002.tar"]
    assert m["rows"]["in_unfinished_shards"] == PER_SHARD
    assert m["reasons"]["unfinished_shard"] == PER_SHARD


def test_shards_use_global_ids_and_layout(downloaded):
    out = downloaded["out"]
    stats_names = sorted(p.name for p in out.glob("*_stats.json"))
    assert stats_names == ["00000_stats.json", "00001_stats.json", "00002_stats.json"]
    keys = set()
    for shard in ("00000", "00001", "00002"):
        for key, files in tar_samples(out / f"{shard}.tar").items():
            assert key.startswith(shard)  # img2dataset keys carry the global shard id
            keys.add(key)
            assert set(files) == {"jpg", "txt", "json"}
            meta = json.loads(files["json"])
            assert meta["source"] == "cc3m" and meta["status"] == "success"
            assert files["txt"].decode() == meta["caption"]
            image = Image.open(io.BytesIO(files["jpg"]))
            assert image.format == "JPEG"
            # smaller side brought down to 384, never up; aspect ratio kept
            assert min(image.size) == min(384, meta["original_width"], meta["original_height"])
    assert len(keys) == 14
    assert not list(out.glob(".*.tmp")) and not list((out / "_staging").glob(".*.tmp"))


@pytest.mark.timeout(120)
def test_resume_fetches_only_unfinished_shards(downloaded, image_server, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(downloaded["out"], out)
    before = Counter(image_server.hits)
    again = download_cli(downloaded["tsv"], out, "--slice", "0/2")
    assert again.returncode == 0, again.stderr
    assert Counter(image_server.hits) == before  # everything finished: no request at all
    assert json.loads(again.stdout.strip().splitlines()[-1])["already_finished"] == 1

    # lose shard 1 (a crash before its stats were written): only its URLs are fetched again,
    # while img2dataset (incremental) skips shard 2 of the same slice
    (out / "00001_stats.json").unlink()
    shard1_urls = {json.loads(f["json"])["url"] for f in tar_samples(out / "00001.tar").values()}
    partial = json.loads(run_cli("pipeline.inspect", out).stdout)
    assert partial["unfinished_shards"] == ["00001.tar"] and "00001.tar" not in partial["shards"]
    resumed = download_cli(downloaded["tsv"], out, "--slice", "1/2")
    assert resumed.returncode == 0, resumed.stderr
    new_hits = Counter(image_server.hits) - before
    assert sum(new_hits.values()) == PER_SHARD
    assert {image_server.base_url + p for p in new_hits} >= shard1_urls
    shard2 = {json.loads(f["json"])["url"] for f in tar_samples(out / "00002.tar").values()}
    assert not {image_server.base_url + p for p in new_hits} & shard2
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and Counter(m["reasons"]) == downloaded["expected"]


def test_inspect_cli(downloaded, tmp_path):
    shown = run_cli("pipeline.inspect", downloaded["out"])
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == manifest_mod.build_manifest(downloaded["out"])
    missing = run_cli("pipeline.inspect", tmp_path / "nothing")
    assert missing.returncode == 2 and "nothing" in missing.stderr


def test_refuses_changed_shaping_settings_and_bad_slice(downloaded):
    changed = download_cli(downloaded["tsv"], downloaded["out"], "--image-size", "512")
    assert changed.returncode == 2 and "image_size" in changed.stderr
    bad = download_cli(downloaded["tsv"], downloaded["out"], "--slice", "2/2")
    assert bad.returncode == 2 and "--slice" in bad.stderr


# --------------------------------------------------------------------------- manifest API
def test_read_manifest_and_shard_sizes(downloaded):
    out = downloaded["out"]
    m = manifest_mod.read_manifest(out)
    assert m == manifest_mod.read_manifest(f"file://{out}") == manifest_mod.read_manifest(out / "manifest.json")
    sizes = manifest_mod.shard_sizes(str(out))
    assert sizes == {f"{out}/{name}": n for name, n in m["shards"].items()}
    import fsspec
    fs = fsspec.filesystem("memory")
    fs.pipe("/remote/cc3m/manifest.json", json.dumps(m).encode())
    assert manifest_mod.shard_sizes("memory://remote/cc3m") == {
        f"memory://remote/cc3m/{name}": n for name, n in m["shards"].items()}
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        manifest_mod.read_manifest("memory://remote/none")


def test_manifest_for_generated_shards(tmp_path):
    made = manifest_mod.manifest_for_shards({"00000.tar": 3, "00001.tar": 2}, source="demo")
    manifest_mod.atomic_write_json(str(tmp_path / "manifest.json"), made)
    assert manifest_mod.read_manifest(tmp_path)["total_samples"] == 5
    assert manifest_mod.shard_sizes(tmp_path) == {f"{tmp_path}/00000.tar": 3, f"{tmp_path}/00001.tar": 2}


def test_reason_of_groups_messages():
    reason = manifest_mod.reason_of
    assert reason("HTTP Error 503: Service Unavailable") == "http_503"
    assert reason("<urlopen error timed out>") == "timeout"
    assert reason("<urlopen error [Errno 111] Connection refused>") == "connection_error"
    assert reason("cannot identify image file <_io.BytesIO object at 0x7f00>") == "not_an_image"
    assert reason("something new") == "other"


# --------------------------------------------------------------------------- pack
def test_pack_local_files(tmp_path, image_folder):
    (tmp_path / "imgs").mkdir()
    for name in ("img00.jpg", "img01.jpg", "pic.png", "small.jpg"):
        shutil.copy(image_folder / name, tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "empty.jpg").write_bytes(b"")
    (tmp_path / "imgs" / "text.jpg").write_bytes(b"not an image")
    ann = tmp_path / "coco.json"
    ann.write_text(json.dumps([
        {"image": "imgs/img00.jpg", "caption": ["a", "b"]},
        {"image": "imgs/img01.jpg", "caption": "c"},
        {"image": "imgs/pic.png", "caption": "d"},
        {"image": "imgs/small.jpg", "caption": "e"},
        {"image": "imgs/missing.jpg", "caption": "f"},
        {"image": "imgs/empty.jpg", "caption": "g"},
        {"image": "imgs/text.jpg", "caption": "h"},
        {"image": "imgs/img00.jpg", "caption": ""},
    ]))
    settings = download.load_settings(download.DEFAULT_CONFIG,
                                      {"processes": 1, "number_sample_per_shard": 4})
    out = tmp_path / "coco_shards"
    summary = download.run("coco", ann, out, settings, image_root=tmp_path)
    assert summary["mode"] == "pack" and summary["unfinished"] == []
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["accounted"]
    assert m["reasons"] == {"success": 5, "empty_file": 1, "file_missing": 1, "not_an_image": 1,
                            "rejected:empty_caption": 1}
    assert m["shards"] == {"00000.tar": 4, "00001.tar": 1}
    samples = tar_samples(out / "00000.tar")
    captions = sorted(f["txt"].decode() for f in samples.values())
    assert captions == ["a", "b", "c", "d"]
    meta = json.loads(next(iter(samples.values()))["json"])
    assert set(meta) == {"source", "caption", "url", "key", "status", "error_message", "width",
                         "height", "original_width", "original_height", "sha256"}
    assert meta["source"] == "coco" and Path(meta["url"]).is_absolute()
    small = [f for f in tar_samples(out / "00001.tar").values()][0]
    assert Image.open(io.BytesIO(small["jpg"])).size == (200, 120)  # never upscaled

    # a shard whose stats were cut short (interrupted) is unfinished, not counted; a re-run redoes it
    stats = out / "00001_stats.json"
    stats.write_text(stats.read_text()[:40])
    partial = manifest_mod.build_manifest(out)
    assert not partial["complete"] and partial["unfinished_shards"] == ["00001.tar"]
    assert partial["total_samples"] == 4 and partial["accounted"]
    assert partial["reasons"]["unfinished_shard"] == 4
    again = download.run("coco", ann, out, settings, image_root=tmp_path)
    assert again["already_finished"] == 1 and again["manifest"]["complete"]
    assert manifest_mod.read_manifest(out)["reasons"] == m["reasons"]


def test_mixed_urls_and_paths_are_refused(tmp_path):
    ann = tmp_path / "mixed.json"
    ann.write_text(json.dumps([{"image": "a.jpg", "caption": "x"},
                               {"image": "http://h/b.jpg", "caption": "y"}]))
    settings = download.load_settings(download.DEFAULT_CONFIG, {"processes": 1})
    with pytest.raises(download.DownloadError, match="mixes 1 URLs and 1 file paths"):
        download.run("coco", ann, tmp_path / "out", settings)
