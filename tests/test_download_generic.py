"""Bring-your-own lists (`--source generic`), refusing misread lists, the manifest command for
folders img2dataset made elsewhere, and the `download` extra's import guard.

Budget: one img2dataset run (the `generic` fixture, one process); everything else
stages only, packs a few local files in-process, or reuses that output. Slices are
the built-in sources' code path after staging (tests/test_download.py); here the
staged slice input is checked to carry the extra columns.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import download, manifest as manifest_mod
from pipeline.sources import EMPTY_CAPTION, INVALID_URL, MALFORMED_ROW, MISSING_URL, SourceRows
from tests.fixtures.http_images import CLIENT_TIMEOUT
from tests.test_download import tar_samples

REPO = Path(__file__).resolve().parents[1]
PER_SHARD = 4
ENV = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")


def run_cli(module: str, *args, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def generic_cli(listing: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return run_cli("pipeline.download", "--source", "generic", "--input", listing, "--output", out,
                   "--processes", 1, "--threads", 8, "--timeout", CLIENT_TIMEOUT, "--retries", 0,
                   "--samples-per-shard", PER_SHARD, *extra)


def settings(**overrides):
    return download.load_settings(download.DEFAULT_CONFIG,
                                  {"processes": 1, "number_sample_per_shard": PER_SHARD, **overrides})


def generic_table(base: str) -> tuple[pa.Table, Counter]:
    """10 rows with img2dataset-style column names and two columns to keep; the reasons they end under."""
    rows = [  # (TEXT, URL, similarity, license)
        ("zero", f"{base}/img00.jpg", 0.30, "cc-by"),
        ("one", f"{base}/img01.jpg", 0.31, "cc0"),
        ("gone", f"{base}/404/img02.jpg", 0.32, "cc0"),
        ("too small", f"{base}/small.jpg", 0.33, "cc0"),        # 200x120 < --min-image-size 150
        ("no url", "not a url", 0.34, "cc0"),                    # rejected: invalid_url
        ("too wide", f"{base}/wide.jpg", 0.35, "cc0"),          # 600x150 > --max-aspect-ratio 3
        ("three", f"{base}/img03.jpg", 0.36, "cc-by-sa"),
        ("", f"{base}/img04.jpg", 0.37, "cc0"),                  # rejected: empty caption
        ("png", f"{base}/pic.png", 0.38, "cc0"),
        ("five", f"{base}/img05.jpg", 0.39, None),
    ]
    text, url, similarity, license_ = (list(c) for c in zip(*rows))
    table = pa.table({"TEXT": text, "URL": url, "similarity": similarity, "license": license_,
                      "unused": list(range(len(rows)))})
    expected = Counter({"success": 5, "http_404": 1, "filtered_by_size": 2,
                        "rejected:invalid_url": 1, "rejected:empty_caption": 1})
    return table, expected


GENERIC_ARGS = ("--input-format", "parquet", "--url-col", "URL", "--caption-col", "TEXT",
                "--save-additional-columns", "similarity", "license",
                "--min-image-size", 150, "--max-aspect-ratio", 3)


@pytest.fixture(scope="module")
def generic(image_server, image_folder, tmp_path_factory):
    """A generic parquet list, downloaded (8 accepted rows, 2 shards)."""
    Image.new("RGB", (600, 150), (10, 200, 30)).save(image_folder / "wide.jpg")
    tmp = tmp_path_factory.mktemp("generic")
    table, expected = generic_table(image_server.base_url)
    listing = tmp / "my_list.parquet"
    pq.write_table(table, listing)
    out = tmp / "shards"
    start = Counter(image_server.hits)
    done = generic_cli(listing, out, *GENERIC_ARGS)
    assert done.returncode == 0, done.stderr
    return {"listing": listing, "out": out, "table": table, "expected": expected, "done": done,
            "hits": Counter(image_server.hits) - start}


@pytest.mark.timeout(180)
def test_generic_parquet_list_with_extra_columns(generic):
    m = json.loads((generic["out"] / "manifest.json").read_text())
    assert m["complete"] and m["accounted"] and m["source"] == "generic"
    assert Counter(m["reasons"]) == generic["expected"]
    assert m["shards"] == {"00000.tar": 2, "00001.tar": 3}
    assert m["settings"]["min_image_size"] == 150 and m["settings"]["max_aspect_ratio"] == 3
    by_url = {row["URL"]: row for row in generic["table"].to_pylist()}
    seen = set()
    for name in m["shards"]:
        for files in tar_samples(generic["out"] / name).values():
            meta = json.loads(files["json"])
            row = by_url[meta["url"]]
            # the kept columns land in every sample's json with their types; others do not
            assert meta["similarity"] == row["similarity"] and meta["license"] == row["license"]
            assert meta["source"] == "generic" and "unused" not in meta and "URL" not in meta
            assert files["txt"].decode() == row["TEXT"] == meta["caption"]
            seen.add(row["TEXT"])
    assert seen == {"zero", "one", "three", "png", "five"}
    # each staged URL fetched once; the rejected rows never
    assert sum(generic["hits"].values()) == 8


def test_download_prints_counts_by_reason(generic):
    done = generic["done"]
    lines = done.stderr.splitlines()
    for reason, count in generic["expected"].items():
        assert any(line.split()[:2] == [reason, str(count)] for line in lines), (reason, done.stderr)
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # stdout's last line stays the JSON
    assert Counter(summary["manifest"]["reasons"]) == generic["expected"]
    assert summary["slice_samples"] == 5


def test_generic_resume_slices_and_changed_columns(generic, image_server, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(generic["out"], out)
    before = Counter(image_server.hits)
    again = generic_cli(generic["listing"], out, "--slice", "1/2", *GENERIC_ARGS)
    assert again.returncode == 0, again.stderr
    assert Counter(image_server.hits) == before  # finished: nothing fetched again
    assert json.loads(again.stdout.strip().splitlines()[-1])["already_finished"] == 1
    # what a Slurm task of slice 1/2 hands img2dataset: its shard's rows with the kept columns
    part = pq.read_table(download.write_slice_input(out, 1, 2))
    assert part.column_names == ["url", "caption", "source", "similarity", "license"]
    assert part.column("caption").to_pylist() == ["too wide", "three", "png", "five"]
    # the staged rows depend on the columns: another choice needs another --output
    with pytest.raises(download.DownloadError, match="read="):
        download.run("generic", generic["listing"], out, settings(min_image_size=150, max_aspect_ratio=3),
                     read={"url_col": "URL", "caption_col": "TEXT", "extra_columns": ["similarity"]})


@pytest.mark.timeout(60)
def test_manifest_command_for_a_folder_img2dataset_made(generic, tmp_path):
    """An img2dataset output folder without our staging: one command makes it loadable."""
    foreign = tmp_path / "img2dataset_out"
    shutil.copytree(generic["out"], foreign, ignore=shutil.ignore_patterns("_staging", "_work", "manifest.json"))
    assert sorted(p.name for p in foreign.iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]
    done = run_cli("pipeline.manifest", foreign)
    assert done.returncode == 0, done.stderr
    staged = json.loads((generic["out"] / "manifest.json").read_text())
    made = manifest_mod.read_manifest(foreign)
    assert made["shards"] == staged["shards"] and made["total_samples"] == staged["total_samples"] == 5
    assert made["complete"] and made["accounted"]
    # what img2dataset saw is accounted the same; the rows our adapter rejected it never saw
    assert made["reasons"] == {r: n for r, n in staged["reasons"].items() if not r.startswith("rejected:")}
    assert manifest_mod.shard_sizes(foreign) == {f"{foreign}/00000.tar": 2, f"{foreign}/00001.tar": 3}
    assert "success" in done.stderr and json.loads(done.stdout)["total_samples"] == 5

    empty = run_cli("pipeline.manifest", tmp_path / "empty_folder_missing")
    assert empty.returncode == 2 and len(empty.stderr.strip().splitlines()) == 1
    (tmp_path / "no_shards").mkdir()
    none = run_cli("pipeline.manifest", tmp_path / "no_shards")
    assert none.returncode == 2 and "webdataset" in none.stderr


# --------------------------------------------------------------------------- misread lists
def test_swapped_columns_exit_nonzero_with_the_cause(tmp_path):
    table, _ = generic_table("http://127.0.0.1:9")
    listing = tmp_path / "list.parquet"
    pq.write_table(table, listing)
    out = tmp_path / "out"
    done = generic_cli(listing, out, "--url-col", "TEXT", "--caption-col", "URL")
    assert done.returncode == 2
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "invalid_url" in message and "90%" in message
    assert "columns in the wrong order or an unexpected header" in message
    assert "--url-col/--caption-col" in message and "'URL'" in message  # the list's columns are named
    assert not (out / "_staging" / "plan.json").exists()  # the corrected command may reuse --output
    # the corrected command stages on the same folder
    fixed = download.run("generic", listing, out, settings(), stage_only=True,
                         read={"url_col": "URL", "caption_col": "TEXT"})
    assert fixed["staged"]["rows_accepted"] == 8


def test_builtin_list_in_the_other_order_is_refused(tmp_path):
    cc12m_order = tmp_path / "cc12m_layout.tsv"  # url<TAB>caption, handed over as cc3m
    cc12m_order.write_text("".join(f"http://x/{i}.jpg\tcaption {i}\n" for i in range(6)))
    with pytest.raises(download.DownloadError, match=r"100% of the 6 rows .* invalid_url .*cc3m reads caption<TAB>url"):
        download.run("cc3m", cc12m_order, tmp_path / "out", settings(), stage_only=True)
    # a header line alone is one rejected row, well under the share: accepted
    with_header = tmp_path / "with_header.tsv"
    with_header.write_text("caption\turl\n" + "".join(f"caption {i}\thttp://x/{i}.jpg\n" for i in range(6)))
    staged = download.run("cc3m", with_header, tmp_path / "out2", settings(), stage_only=True)
    assert staged["staged"]["rejects"] == {INVALID_URL: 1}
    # the share is configurable; a list with no usable row is refused whatever it is
    with pytest.raises(download.DownloadError, match="over --max-input-failure-share 0.1"):
        download.run("cc3m", with_header, tmp_path / "out3", settings(max_input_failure_share=0.1),
                     stage_only=True)
    with pytest.raises(download.DownloadError, match="none of the 6 rows"):
        download.run("cc3m", cc12m_order, tmp_path / "out4", settings(max_input_failure_share=1.0),
                     stage_only=True)
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(download.DownloadError, match="no rows"):
        download.run("cc3m", tmp_path / "empty.tsv", tmp_path / "out5", settings(), stage_only=True)


def test_run_with_no_sample_exits_nonzero(tmp_path, capsys):
    """Every row fetched and failed (here: packed from files that are not there): exit 2, not success."""
    ann = tmp_path / "coco.json"
    ann.write_text(json.dumps([{"image": f"missing/{i}.jpg", "caption": f"c{i}"} for i in range(3)]))
    code = download.main(["--source", "coco", "--input", str(ann), "--output", str(tmp_path / "out"),
                          "--image-root", str(tmp_path), "--processes", "1",
                          "--samples-per-shard", str(PER_SHARD)])
    out, err = capsys.readouterr()
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert "yielded no sample" in last and "100%" in last and "file_missing" in last and "--image-root" in last
    assert any(line.split()[:2] == ["file_missing", "3"] for line in err.splitlines())
    assert json.loads(out.strip().splitlines()[-1])["manifest"]["total_samples"] == 0


# --------------------------------------------------------------------------- adapters, settings
def test_generic_formats_and_column_errors(tmp_path):
    csv_list = tmp_path / "list.csv"
    csv_list.write_text('caption,url,score\n"a, quoted",http://x/1.jpg,0.5\n'
                        'short row\n"two\nlines",http://x/2.jpg,1\n,http://x/3.jpg,2\n')
    reader = SourceRows("generic", csv_list, extra_columns=["score"])
    assert list(reader) == [("http://x/1.jpg", "a, quoted", "generic", 0.5),
                            ("http://x/2.jpg", "two\nlines", "generic", 1.0)]
    assert reader.rejects == {MALFORMED_ROW: 1, EMPTY_CAPTION: 1} and reader.rows_read == 4

    tsv_list = tmp_path / "list.tsv"
    tsv_list.write_text("TEXT\tURL\nx\thttp://x/1.jpg\ny\t\n")
    reader = SourceRows("generic", tsv_list, url_col="URL", caption_col="TEXT")
    assert list(reader) == [("http://x/1.jpg", "x", "generic")] and reader.rejects == {MISSING_URL: 1}

    jsonl_list = tmp_path / "list.jsonl"
    jsonl_list.write_text('{"url": "http://x/1.jpg", "caption": "x", "tags": ["a", "b"]}\n\n'
                          '{"url": "http://x/2.jpg", "caption": "y", "tags": []}\n')
    assert list(SourceRows("generic", jsonl_list, extra_columns=["tags"])) == [
        ("http://x/1.jpg", "x", "generic", ["a", "b"]), ("http://x/2.jpg", "y", "generic", [])]

    with pytest.raises(ValueError, match=r"no column 'link'.*\['caption', 'url', 'score'\]"):
        list(SourceRows("generic", csv_list, url_col="link"))
    with pytest.raises(ValueError, match="--input-format"):
        SourceRows("generic", csv_list, input_format="xml")
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format"):
        SourceRows("generic", tmp_path / "list.txt")
    with pytest.raises(ValueError, match="taken by the sample json"):
        SourceRows("generic", csv_list, extra_columns=["status"])
    with pytest.raises(ValueError, match="need --source generic"):
        SourceRows("cc3m", csv_list, url_col="url")


def test_plans_staged_before_the_new_settings_are_reused(tmp_path):
    listing = tmp_path / "cc3m.tsv"
    listing.write_text("".join(f"caption {i}\thttp://x/{i}.jpg\n" for i in range(5)))
    out = tmp_path / "out"
    download.run("cc3m", listing, out, settings(), stage_only=True)
    plan_file = out / "_staging" / "plan.json"
    plan = json.loads(plan_file.read_text())
    for key in ("min_image_size", "max_image_area", "max_aspect_ratio"):
        del plan["settings"][key]
    del plan["read"]
    plan_file.write_text(json.dumps(plan))
    assert download.run("cc3m", listing, out, settings(), stage_only=True)["staged_shards"] == 2
    with pytest.raises(download.DownloadError, match="min_image_size"):
        download.run("cc3m", listing, out, settings(min_image_size=64), stage_only=True)


def test_missing_download_extra_is_one_line(tmp_path):
    """Without img2dataset/pyarrow (training nodes), the stage names the extra instead of a traceback."""
    code = ("import sys; sys.modules['img2dataset'] = None; sys.modules['pyarrow'] = None; "
            "from pipeline.download import main; "
            f"sys.exit(main(['--source', 'cc3m', '--input', 'x.tsv', '--output', {str(tmp_path)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "pipeline.download: img2dataset and pyarrow not installed; the download stage is an optional "
        "extra: pip install -e '.[download]'"]
