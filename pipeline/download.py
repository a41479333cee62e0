"""Download stage: a source's URL list -> WebDataset shards with a manifest, via img2dataset.

    python -m pipeline.download --source cc3m --input Train_GCC-training.tsv --output /data/cc3m
        [--slice I/N] [--processes N] [--threads N] [--image-size 384] [--timeout S] ...
        [--image-root DIR] [--stage-only] [--config configs/download.yaml]
    python -m pipeline.download --source generic --input laion_part0.parquet --output /data/laion \
        [--input-format parquet|csv|tsv|jsonl] --url-col URL --caption-col TEXT \
        [--save-additional-columns similarity ...] [--min-image-size 64] [--max-aspect-ratio 3]

Needs the `download` extra (`pip install -e '.[download]'`: img2dataset, pyarrow);
without it the command says so in one line.

Steps, each safe to repeat:
1. Stage: the source adapter (`pipeline.sources`) reads the native list once
   into `DIR/_staging/rows.parquet` (columns url, caption, source and a
   generic list's extra columns; one row group per shard) and
   `DIR/_staging/plan.json` (input, rows read, adapter rejects by reason,
   shard count, the shaping settings). A later run reuses it; one with another
   input, other columns or other shaping settings is refused. A list that
   yields no row, or whose rows are rejected for one layout reason (invalid
   URL, empty caption, ...) beyond `max_input_failure_share`, is refused with
   the likely cause (columns swapped, a header) before anything is fetched,
   and nothing is staged.
2. Slice: shard k always holds staged rows [k*S, (k+1)*S) (S =
   number_sample_per_shard), so shard ids are global and independent of the
   slicing. `--slice I/N` (0 <= I < N) takes shards
   [floor(I*K/N), floor((I+1)*K/N)) of the K planned ones. A Slurm array runs
   `--slice $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT` (array indices 0..N-1);
   each task writes only its own shard range, and `--stage-only` as a first
   job saves every task from parsing the list itself.
3. Fetch: img2dataset (`img2dataset.download`, webdataset output,
   `incremental_mode="incremental"`) downloads the slice into its own work
   folder `DIR/_work/<first>-<end>/` (img2dataset keeps a `_tmp` folder and
   reads every `*.json` of its output folder, so concurrent slices and our
   manifest must not share one), numbering shards from the slice's first id.
   Rows that are file paths (COCO, VG on disk) are packed by `pipeline.pack`
   instead, with the same layout.
4. Publish: each finished shard's tar and parquet move to DIR, its
   `_stats.json` is copied last, so a tar in DIR with stats is complete.
5. `DIR/manifest.json` is rebuilt (`pipeline.manifest`).

Resume: a shard is finished when DIR has its tar and stats; a re-run hands
img2dataset the stats of finished shards, so they are skipped and not fetched
again, and only unfinished shards are (re)done.

Output: the rows by reason on stderr, then a JSON summary as the last line of
stdout. Exit status 0 when every shard of the slice is finished and it holds
samples; 1 when some shards are not finished (re-run the same command to
resume); 2 for a problem to fix first: bad options or input, a list refused
as misread, or a slice whose finished shards hold no sample at all.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from importlib import import_module
from pathlib import Path
from unittest import mock

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import

import yaml  # noqa: E402

try:  # the `download` extra; main() reports its absence in one line
    import pyarrow as pa  # noqa: E402
    import pyarrow.parquet as pq  # noqa: E402
except ImportError:
    pa = pq = None

from pipeline import worker_pool  # noqa: E402
from pipeline.manifest import (  # noqa: E402
    PLAN_NAME, SHARD_SUFFIX, STAGING_DIR, STATS_SUFFIX, atomic_write_json, format_reasons,
    planned_rows, read_stats, shard_name, temporary_name, write_manifest,
)
from pipeline.sources import (  # noqa: E402
    ADAPTERS, INPUT_FORMAT_REASONS, INPUT_FORMATS, SourceRows, is_web_url, likely_cause,
)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "download.yaml"
WORK_DIR = "_work"
ROWS_NAME = "rows.parquet"
EXTRA_PACKAGES = ("img2dataset", "pyarrow")
INSTALL_HINT = "pip install -e '.[download]'"
# settings that shape the shards: fixed for the life of an output folder
SHAPING = ("image_size", "resize_mode", "resize_only_if_bigger", "encode_format",
           "encode_quality", "number_sample_per_shard", "shard_name_digits",
           "min_image_size", "max_image_area", "max_aspect_ratio")
OPERATIONAL = ("processes", "threads", "timeout", "retries", "extract_exif", "compute_hash",
               "disallowed_header_directives", "max_input_failure_share")
# settings added after the first release: configs (and plans) without them mean these
LATER_DEFAULTS = {"min_image_size": 0, "max_image_area": None, "max_aspect_ratio": None,
                  "max_input_failure_share": 0.5}
SIZE_FILTERS = ("min_image_size", "max_image_area", "max_aspect_ratio")
MODE_DOWNLOAD = "download"
MODE_PACK = "pack"
# what most often lies behind a slice that ends with no sample at all, by its top reason
NO_SAMPLE_CAUSES = {
    "connection_error": "no network access from this node (proxy, firewall, DNS?)",
    "timeout": "no network access from this node, or --timeout too short",
    "ssl_error": "TLS failures: no network access or a proxy that intercepts HTTPS",
    "http_403": "the servers refuse the requests",
    "http_404": "the URLs are stale",
    "not_an_image": "the URL column points at web pages, not images",
    "filtered_by_size": "--min-image-size/--max-image-area/--max-aspect-ratio are too strict",
    "x_robots_tag": "every site opts out (disallowed_header_directives in configs/download.yaml)",
    "file_missing": "the image paths do not exist: check --image-root",
}


class DownloadError(Exception):
    """A problem with the inputs or the output folder, reported without a traceback.

    `summary` is set when the error comes after the slice was fetched, so the
    counts are still printed.
    """

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary


def missing_packages() -> list[str]:
    """The `download` extra's packages that are not installed (found without importing them)."""
    missing = []
    for name in EXTRA_PACKAGES:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


# --------------------------------------------------------------------------- settings
def load_settings(config: str | Path, overrides: dict) -> dict:
    with open(config, encoding="utf-8") as file:
        settings = {**LATER_DEFAULTS, **yaml.safe_load(file)}
    missing = [k for k in SHAPING + OPERATIONAL if k not in settings]
    if missing:
        raise DownloadError(f"download config {config} lacks {missing}")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if settings["processes"] is None:
        settings["processes"] = len(os.sched_getaffinity(0))
    for key in ("image_size", "number_sample_per_shard", "processes", "threads", "shard_name_digits"):
        if not isinstance(settings[key], int) or settings[key] < 1:
            raise DownloadError(f"setting {key} must be a positive integer, got {settings[key]!r}")
    if settings["number_sample_per_shard"] < 2:
        raise DownloadError("setting number_sample_per_shard must be at least 2 "
                            "(img2dataset derives key widths from its logarithm)")
    if settings["timeout"] <= 0 or settings["retries"] < 0:
        raise DownloadError(f"timeout must be > 0 and retries >= 0, got timeout="
                            f"{settings['timeout']!r}, retries={settings['retries']!r}")
    if not isinstance(settings["min_image_size"], int) or settings["min_image_size"] < 0:
        raise DownloadError(f"setting min_image_size must be an integer >= 0, got {settings['min_image_size']!r}")
    for key, low in (("max_image_area", 0), ("max_aspect_ratio", 1)):
        value = settings[key]
        if value is not None and (not isinstance(value, (int, float)) or value < low):
            raise DownloadError(f"setting {key} must be null (no limit) or a number >= {low}, got {value!r}")
    share = settings["max_input_failure_share"]
    if not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise DownloadError(f"setting max_input_failure_share must be in [0, 1], got {share!r}")
    return settings


def parse_slice(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise DownloadError(f"--slice must look like I/N (e.g. 3/10), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise DownloadError(f"--slice {text}: need 0 <= I < N")
    return index, count


def shard_range(num_shards: int, index: int, count: int) -> tuple[int, int]:
    """Shards [first, end) of slice `index` of `count`: contiguous, balanced, covering all."""
    return num_shards * index // count, num_shards * (index + 1) // count


# --------------------------------------------------------------------------- staging
def _input_fingerprint(path: Path) -> dict:
    return {"path": str(path.resolve()), "size": path.stat().st_size}


class _ShardRowGroups:
    """Parquet writer whose row groups hold exactly `per_shard` rows (the last one fewer).

    Opened on the first table, so the schema (a generic list's extra columns) comes from the data.
    """

    def __init__(self, path: Path, per_shard: int):
        self.path, self.per_shard = path, per_shard
        self.writer = None
        self.pending: list = []
        self.pending_rows = 0

    def write(self, table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.per_shard:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self.pending)
        whole = table.num_rows if final else table.num_rows // self.per_shard * self.per_shard
        if whole:
            self.writer.write_table(table.slice(0, whole), row_group_size=self.per_shard)
        rest = table.slice(whole)
        self.pending, self.pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

    def close(self) -> None:
        if self.writer is not None:
            if self.pending_rows:
                self._flush(final=True)
            self.writer.close()


def check_input(plan: dict, settings: dict, input_path: Path) -> None:
    """Refuse a list that was misread: no usable row, or most rows rejected for one layout reason."""
    rows, rejects = plan["rows_read"], plan["rejects"]
    limit = settings["max_input_failure_share"]
    ranked = sorted(rejects.items(), key=lambda kv: (-kv[1], kv[0]))
    for reason, count in ranked:
        if reason in INPUT_FORMAT_REASONS and count / rows > limit:
            cause = likely_cause(plan["source"], reason, plan.get("read"), plan.get("input_columns"))
            raise DownloadError(
                f"{count / rows:.0%} of the {rows} rows of {input_path} were rejected as {reason} "
                f"(over --max-input-failure-share {limit:g}); likely cause: {cause}")
    if plan["rows_accepted"] == 0:
        if not ranked:
            raise DownloadError(f"{input_path} holds no rows: nothing to download")
        reason, count = ranked[0]
        cause = likely_cause(plan["source"], reason, plan.get("read"), plan.get("input_columns"))
        raise DownloadError(f"none of the {rows} rows of {input_path} is usable (most rejected as "
                            f"{reason}: {count / rows:.0%}); likely cause: {cause}")


def stage(source: str, input_path: Path, output: Path, settings: dict,
          image_root: Path | None, read: dict | None = None) -> dict:
    """Read the source list into the staging parquet and plan; reuse them when they exist.

    `read` holds a generic list's input_format, url_col, caption_col and
    extra_columns. A list refused by `check_input` leaves nothing staged, so
    the corrected command can run on the same --output.
    """
    read = read or {}
    rows = SourceRows(source, input_path, image_root, **read)
    staging = output / STAGING_DIR
    plan_file = staging / PLAN_NAME
    wanted = {
        "source": source,
        "input": _input_fingerprint(input_path),
        "image_root": str(image_root.resolve()) if image_root is not None else None,
        "read": rows.read_options(),
        "settings": {k: settings[k] for k in SHAPING},
    }
    if plan_file.is_file():
        with open(plan_file, encoding="utf-8") as file:
            plan = json.load(file)
        staged = {**{k: plan.get(k) for k in wanted if k != "settings"}, **plan["settings"]}
        asked = {**{k: wanted[k] for k in wanted if k != "settings"}, **wanted["settings"]}
        for key, value in asked.items():
            if staged.get(key, LATER_DEFAULTS.get(key)) != value:
                raise DownloadError(
                    f"{output} was staged with {key}={staged.get(key)!r}, this run asks for "
                    f"{value!r}; use another --output (or delete {staging} and the shards to start over)")
        check_input(plan, settings, input_path)
        return plan

    staging.mkdir(parents=True, exist_ok=True)
    per_shard = settings["number_sample_per_shard"]
    rows_file = staging / ROWS_NAME
    tmp = temporary_name(rows_file)
    kinds: Counter = Counter()
    accepted = 0
    writer = _ShardRowGroups(tmp, per_shard)
    try:
        try:
            for table in rows.tables():
                urls = table.column("url").to_pylist()
                web = sum(map(is_web_url, urls))
                kinds[MODE_DOWNLOAD] += web
                kinds[MODE_PACK] += len(urls) - web
                writer.write(table)
                accepted += table.num_rows
        finally:
            writer.close()
        kinds = +kinds
        if len(kinds) > 1:
            raise DownloadError(f"{input_path} mixes {kinds[MODE_DOWNLOAD]} URLs and "
                                f"{kinds[MODE_PACK]} file paths; split it into one list of each")
        plan = dict(wanted)
        plan.update({
            "mode": next(iter(kinds), MODE_DOWNLOAD),
            "rows_read": rows.rows_read,
            "rows_accepted": accepted,
            "rejects": dict(rows.rejects),
            "num_shards": math.ceil(accepted / per_shard),
        })
        if rows.input_columns is not None:
            plan["input_columns"] = rows.input_columns
        check_input(plan, settings, input_path)
        if plan["mode"] == MODE_PACK:
            filters = {k: settings[k] for k in SIZE_FILTERS if settings[k] != LATER_DEFAULTS[k]}
            if filters:
                raise DownloadError(f"{input_path} lists local files, which are packed without the "
                                    f"size filters {filters}; drop them for this source")
        os.replace(tmp, rows_file)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_json(plan_file, plan)
    return plan


def write_slice_input(output: Path, first: int, end: int) -> Path:
    """The staged rows of shards [first, end) as img2dataset's input file."""
    path = output / STAGING_DIR / f"slice-{first}-{end}.parquet"
    if not path.is_file():
        table = pq.ParquetFile(output / STAGING_DIR / ROWS_NAME).read_row_groups(range(first, end))
        tmp = temporary_name(path)
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- work folder
def _files(folder: Path, name: str) -> dict[str, Path]:
    return {kind: folder / f"{name}{kind}" for kind in (SHARD_SUFFIX, ".parquet", STATS_SUFFIX)}


def _finished(folder: Path, name: str) -> bool:
    files = _files(folder, name)
    return files[SHARD_SUFFIX].is_file() and read_stats(files[STATS_SUFFIX]) is not None


def prepare_work(output: Path, work: Path, names: list[str]) -> list[str]:
    """Make the work folder tell img2dataset exactly which shards are finished; returns the others.

    A shard published in `output` gets its stats copied into `work` (img2dataset
    skips shards whose stats exist). Stats left in `work` for a shard that is
    neither published nor still in `work` are removed, so it is done again.
    """
    work.mkdir(parents=True, exist_ok=True)
    todo = []
    for name in names:
        out, wrk = _files(output, name), _files(work, name)
        if _finished(output, name):
            if not wrk[STATS_SUFFIX].is_file():
                shutil.copyfile(out[STATS_SUFFIX], wrk[STATS_SUFFIX])
            continue
        out[STATS_SUFFIX].unlink(missing_ok=True)  # stats without a tar, or cut short
        if not _finished(work, name):
            wrk[STATS_SUFFIX].unlink(missing_ok=True)
        todo.append(name)
    return todo


def publish(output: Path, work: Path, names: list[str]) -> None:
    """Move each finished shard from `work` to `output`; its stats arrive last."""
    for name in names:
        out, wrk = _files(output, name), _files(work, name)
        if _finished(output, name) or not _finished(work, name):
            continue
        for kind in (SHARD_SUFFIX, ".parquet"):
            if wrk[kind].is_file():
                os.replace(wrk[kind], out[kind])
        tmp = temporary_name(out[STATS_SUFFIX])
        shutil.copyfile(wrk[STATS_SUFFIX], tmp)
        os.replace(tmp, out[STATS_SUFFIX])


# --------------------------------------------------------------------------- fetching
def run_img2dataset(slice_file: Path, work: Path, first: int, settings: dict,
                    extra_columns: list[str] | tuple = ()) -> None:
    """Download the slice with img2dataset, numbering its shards from `first`.

    `img2dataset.download` has no start-shard argument (its "extend" mode
    derives one but then re-downloads finished shards), while its Reader has
    `start_shard_id`; a Reader subclass that sets it is installed for the call.
    Its workers and progress logger are replaced by warm-starting ones
    (`pipeline.worker_pool`): same work, without re-importing img2dataset per process.
    """
    try:
        with worker_pool.torch_hidden():
            import img2dataset
    except ImportError as err:
        raise DownloadError(f"img2dataset cannot be imported ({err}); {INSTALL_HINT}") from err

    main_module = import_module("img2dataset.main")

    class ReaderFromFirstShard(main_module.Reader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.start_shard_id = first

    with mock.patch.object(main_module, "Reader", ReaderFromFirstShard), \
            mock.patch.object(main_module, "multiprocessing_distributor",
                              worker_pool.multiprocessing_distributor), \
            mock.patch.object(main_module, "LoggerProcess", worker_pool.thread_logger_class()):
        img2dataset.download(
            url_list=str(slice_file),
            output_folder=str(work),
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=["source", *extra_columns],
            output_format="webdataset",
            incremental_mode="incremental",
            image_size=settings["image_size"],
            resize_mode=settings["resize_mode"],
            resize_only_if_bigger=settings["resize_only_if_bigger"],
            encode_format=settings["encode_format"],
            encode_quality=settings["encode_quality"],
            number_sample_per_shard=settings["number_sample_per_shard"],
            oom_shard_count=settings["shard_name_digits"],
            processes_count=settings["processes"],
            thread_count=settings["threads"],
            timeout=settings["timeout"],
            retries=settings["retries"],
            extract_exif=settings["extract_exif"],
            compute_hash=settings["compute_hash"],
            disallowed_header_directives=list(settings["disallowed_header_directives"]),
            min_image_size=settings["min_image_size"],
            max_image_area=_no_limit(settings["max_image_area"]),
            max_aspect_ratio=_no_limit(settings["max_aspect_ratio"]),
            enable_wandb=False,
            distributor="multiprocessing",
        )


def _no_limit(value):
    return float("inf") if value is None else value


def run(source: str, input_path: Path, output: Path, settings: dict, slice_index: int = 0,
        slice_count: int = 1, image_root: Path | None = None, stage_only: bool = False,
        read: dict | None = None) -> dict:
    """Stage, fetch (or pack) the slice's unfinished shards, publish, write the manifest.

    Returns a summary: the slice's shard range, shards done before and after,
    rows fetched and rows per second of the fetch, the folder's rows by reason.
    Raises DownloadError (with the summary) when the slice's shards are all
    finished and hold no sample.
    """
    output.mkdir(parents=True, exist_ok=True)
    plan = stage(source, input_path, output, settings, image_root, read)
    first, end = shard_range(plan["num_shards"], slice_index, slice_count)
    summary = {"output": str(output), "slice": f"{slice_index}/{slice_count}",
               "shards": [first, end], "mode": plan["mode"], "rows_fetched": 0, "seconds": 0.0}
    if stage_only:
        summary["staged_shards"] = plan["num_shards"]
        summary["staged"] = {"rows_read": plan["rows_read"], "rows_accepted": plan["rows_accepted"],
                             "rejects": plan["rejects"]}
        return summary
    digits = settings["shard_name_digits"]
    names = [shard_name(k, digits) for k in range(first, end)]
    work = output / WORK_DIR / f"{first}-{end}"
    todo = []
    if names:
        publish(output, work, names)  # shards finished by an interrupted earlier run
        todo = prepare_work(output, work, names)
    summary["already_finished"] = len(names) - len(todo)
    if todo:
        if plan["mode"] != MODE_PACK or worker_pool.pool_needed(settings["processes"], len(todo)):
            worker_pool.start_early()  # the workers' imports overlap this process's
        summary["rows_fetched"] = sum(planned_rows(plan, int(name)) for name in todo)
        slice_file = write_slice_input(output, first, end)
        started = time.perf_counter()
        if plan["mode"] == MODE_PACK:
            from pipeline.pack import pack_shards
            pack_shards(slice_file, work, first, settings, settings["processes"])
        else:
            run_img2dataset(slice_file, work, first, settings,
                            (plan.get("read") or {}).get("extra_columns", ()))
        summary["seconds"] = round(time.perf_counter() - started, 3)
        summary["rows_per_second"] = round(summary["rows_fetched"] / max(summary["seconds"], 1e-9), 1)
        publish(output, work, names)
    unfinished = [n + SHARD_SUFFIX for n in names if not _finished(output, n)]
    summary["unfinished"] = unfinished
    manifest = write_manifest(output)
    summary["manifest"] = {k: manifest[k] for k in ("complete", "total_samples", "accounted", "reasons")}
    slice_samples = sum(manifest["shards"].get(n + SHARD_SUFFIX, 0) for n in names)
    summary["slice_samples"] = slice_samples
    if names and not unfinished and slice_samples == 0:
        raise DownloadError(no_sample_message(manifest, summary), summary)
    return summary


def no_sample_message(manifest: dict, summary: dict) -> str:
    """One line for a slice that ended with no sample: its folder's top failure and likely cause."""
    failures = {r: n for r, n in manifest["reasons"].items() if r not in ("success", "unfinished_shard")}
    where = f"slice {summary['slice']} (shards {summary['shards'][0]}-{summary['shards'][1] - 1})"
    if not failures:
        return f"{where} yielded no sample"
    reason, count = max(failures.items(), key=lambda kv: kv[1])
    rows = manifest["rows"]["input"] or 1
    cause = NO_SAMPLE_CAUSES.get(reason)
    return (f"{where} yielded no sample: {count / rows:.0%} of the folder's {rows} rows failed as "
            f"{reason}" + (f"; likely cause: {cause}" if cause else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.download",
        description="Download (or pack) one pretraining source into WebDataset shards with a manifest.")
    parser.add_argument("--source", required=True, choices=sorted(ADAPTERS),
                        help="a built-in list format, or generic: any list with --url-col/--caption-col")
    parser.add_argument("--input", required=True, type=Path, help="the source's list file")
    generic = parser.add_argument_group("generic lists (--source generic), named as in img2dataset")
    generic.add_argument("--input-format", "--input_format", dest="input_format", choices=INPUT_FORMATS,
                         help="default: from the file's suffix")
    generic.add_argument("--url-col", "--url_col", dest="url_col", help="URL column (default: url)")
    generic.add_argument("--caption-col", "--caption_col", dest="caption_col",
                         help="caption column (default: caption)")
    generic.add_argument("--save-additional-columns", "--save_additional_columns",
                         dest="save_additional_columns", nargs="+", metavar="COLUMN",
                         help="columns kept in each sample's json (e.g. similarity)")
    parser.add_argument("--output", required=True, type=Path, help="shard folder (local or shared filesystem)")
    parser.add_argument("--image-root", type=Path, help="folder that relative image paths are under")
    parser.add_argument("--slice", "--url-list-slice", dest="slice", default="0/1", metavar="I/N",
                        help="do slice I of N (0-based) of the shards, e.g. for a Slurm array")
    parser.add_argument("--stage-only", action="store_true",
                        help="only read the list into the staging folder (first job of an array)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--processes", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--resize-mode", choices=["keep_ratio", "keep_ratio_largest", "center_crop",
                                                  "border", "no"])
    parser.add_argument("--encode-quality", type=int)
    parser.add_argument("--samples-per-shard", dest="number_sample_per_shard", type=int)
    parser.add_argument("--timeout", type=float)
    parser.add_argument("--retries", type=int)
    parser.add_argument("--min-image-size", "--min_image_size", dest="min_image_size", type=int,
                        help="drop images whose smaller side is below this (px, before resizing)")
    parser.add_argument("--max-image-area", "--max_image_area", dest="max_image_area", type=float,
                        help="drop images with more pixels than this")
    parser.add_argument("--max-aspect-ratio", "--max_aspect_ratio", dest="max_aspect_ratio", type=float,
                        help="drop images whose long/short side ratio exceeds this")
    parser.add_argument("--max-input-failure-share", dest="max_input_failure_share", type=float,
                        help="refuse the list when more than this share of its rows is rejected for one "
                             "layout reason (invalid_url, empty_caption, ...); 1 turns the check off")
    return parser


def report(summary: dict) -> None:
    """The rows by reason on stderr, for people and Slurm logs (stdout keeps the JSON)."""
    if "staged" in summary:
        staged = summary["staged"]
        reasons = {"staged": staged["rows_accepted"],
                   **{f"rejected:{r}": n for r, n in staged["rejects"].items()}}
        print(format_reasons(reasons, staged["rows_read"], f"{summary['output']} staged"), file=sys.stderr)
    elif "manifest" in summary:
        m = summary["manifest"]
        title = (f"{summary['output']}: {m['total_samples']} samples "
                 f"({'complete' if m['complete'] else 'some shards unfinished'})")
        print(format_reasons(m["reasons"], sum(m["reasons"].values()), title), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_packages()
    if missing:
        print(f"pipeline.download: {' and '.join(missing)} not installed; the download stage is an "
              f"optional extra: {INSTALL_HINT}", file=sys.stderr)
        return 2
    try:
        index, count = parse_slice(args.slice)
        overrides = {k: getattr(args, k) for k in ("processes", "threads", "image_size", "resize_mode",
                                                    "encode_quality", "number_sample_per_shard",
                                                    "timeout", "retries", "min_image_size",
                                                    "max_image_area", "max_aspect_ratio",
                                                    "max_input_failure_share")}
        settings = load_settings(args.config, overrides)
        read = {"input_format": args.input_format, "url_col": args.url_col,
                "caption_col": args.caption_col, "extra_columns": args.save_additional_columns or ()}
        summary = run(args.source, args.input, args.output, settings, index, count,
                      args.image_root, args.stage_only, read)
    except (DownloadError, OSError, ValueError) as err:
        summary = getattr(err, "summary", None)
        if summary is not None:
            report(summary)
            print(json.dumps(summary), flush=True)
        print(f"pipeline.download: {err}", file=sys.stderr)
        return 2
    report(summary)
    print(json.dumps(summary), flush=True)
    if summary.get("unfinished"):
        print(f"pipeline.download: {len(summary['unfinished'])} shard(s) unfinished; "
              f"re-run the same command to resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # img2dataset starts a spawn pool: nothing may run on import
    sys.exit(main())
