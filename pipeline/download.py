"""Download stage: a source's URL list -> WebDataset shards with a manifest, via img2dataset.

    python -m pipeline.download --source cc3m --input Train_GCC-training.tsv --output /data/cc3m
        [--slice I/N] [--processes N] [--threads N] [--image-size 384] [--timeout S] ...
        [--image-root DIR] [--stage-only] [--config configs/download.yaml]

Steps, each safe to repeat:
1. Stage: the source adapter (`pipeline.sources`) reads the native list once
   into `DIR/_staging/rows.parquet` (columns url, caption, source; one row
   group per shard) and `DIR/_staging/plan.json` (input, rows read, adapter
   rejects by reason, shard count, the shaping settings). A later run reuses
   it; one with another input or other shaping settings is refused.
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
again, and only unfinished shards are (re)done. Exit status 0 when every shard
of the slice is finished, 1 when some are not (re-run the same command).
"""
from __future__ import annotations

import argparse
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

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

from pipeline.manifest import (  # noqa: E402
    PLAN_NAME, SHARD_SUFFIX, STAGING_DIR, STATS_SUFFIX, atomic_write_json,
    planned_rows, read_stats, shard_name, temporary_name, write_manifest,
)
from pipeline.sources import ADAPTERS, SourceRows, is_web_url  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "download.yaml"
WORK_DIR = "_work"
ROWS_NAME = "rows.parquet"
ROW_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("source", pa.string())])
# settings that shape the shards: fixed for the life of an output folder
SHAPING = ("image_size", "resize_mode", "resize_only_if_bigger", "encode_format",
           "encode_quality", "number_sample_per_shard", "shard_name_digits")
OPERATIONAL = ("processes", "threads", "timeout", "retries", "extract_exif", "compute_hash",
               "disallowed_header_directives")
MODE_DOWNLOAD = "download"
MODE_PACK = "pack"


class DownloadError(Exception):
    """A problem with the inputs or the output folder, reported without a traceback."""


# --------------------------------------------------------------------------- settings
def load_settings(config: str | Path, overrides: dict) -> dict:
    with open(config, encoding="utf-8") as file:
        settings = yaml.safe_load(file)
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


def stage(source: str, input_path: Path, output: Path, settings: dict,
          image_root: Path | None) -> dict:
    """Read the source list into the staging parquet and plan; reuse them when they exist."""
    staging = output / STAGING_DIR
    plan_file = staging / PLAN_NAME
    wanted = {
        "source": source,
        "input": _input_fingerprint(input_path),
        "image_root": str(image_root.resolve()) if image_root is not None else None,
        "settings": {k: settings[k] for k in SHAPING},
    }
    if plan_file.is_file():
        with open(plan_file, encoding="utf-8") as file:
            plan = json.load(file)
        staged = {**{k: plan[k] for k in wanted if k != "settings"}, **plan["settings"]}
        asked = {**{k: wanted[k] for k in wanted if k != "settings"}, **wanted["settings"]}
        for key, value in asked.items():
            if staged.get(key) != value:
                raise DownloadError(
                    f"{output} was staged with {key}={staged.get(key)!r}, this run asks for "
                    f"{value!r}; use another --output (or delete {staging} and the shards to start over)")
        return plan

    staging.mkdir(parents=True, exist_ok=True)
    rows = SourceRows(source, input_path, image_root)
    per_shard = settings["number_sample_per_shard"]
    rows_file = staging / ROWS_NAME
    tmp = temporary_name(rows_file)
    kinds: Counter = Counter()
    accepted = 0
    batch: list[tuple[str, str, str]] = []

    def flush(writer):
        columns = list(zip(*batch)) if batch else [[], [], []]
        writer.write_table(pa.table([pa.array(c, pa.string()) for c in columns], schema=ROW_SCHEMA),
                           row_group_size=per_shard)
        batch.clear()

    try:
        with pq.ParquetWriter(tmp, ROW_SCHEMA) as writer:
            for row in rows:
                kinds[MODE_DOWNLOAD if is_web_url(row[0]) else MODE_PACK] += 1
                batch.append(row)
                accepted += 1
                if len(batch) == per_shard:
                    flush(writer)
            if batch or accepted == 0:
                flush(writer)
        if len(kinds) > 1:
            raise DownloadError(f"{input_path} mixes {kinds[MODE_DOWNLOAD]} URLs and "
                                f"{kinds[MODE_PACK]} file paths; split it into one list of each")
        os.replace(tmp, rows_file)
    finally:
        tmp.unlink(missing_ok=True)
    plan = dict(wanted)
    plan.update({
        "mode": next(iter(kinds), MODE_DOWNLOAD),
        "rows_read": rows.rows_read,
        "rows_accepted": accepted,
        "rejects": dict(rows.rejects),
        "num_shards": math.ceil(accepted / per_shard),
    })
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
def run_img2dataset(slice_file: Path, work: Path, first: int, settings: dict) -> None:
    """Download the slice with img2dataset, numbering its shards from `first`.

    `img2dataset.download` has no start-shard argument (its "extend" mode
    derives one but then re-downloads finished shards), while its Reader has
    `start_shard_id`; a Reader subclass that sets it is installed for the call.
    """
    import img2dataset

    main_module = import_module("img2dataset.main")

    class ReaderFromFirstShard(main_module.Reader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.start_shard_id = first

    with mock.patch.object(main_module, "Reader", ReaderFromFirstShard):
        img2dataset.download(
            url_list=str(slice_file),
            output_folder=str(work),
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=["source"],
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
            enable_wandb=False,
            distributor="multiprocessing",
        )


def run(source: str, input_path: Path, output: Path, settings: dict, slice_index: int = 0,
        slice_count: int = 1, image_root: Path | None = None, stage_only: bool = False) -> dict:
    """Stage, fetch (or pack) the slice's unfinished shards, publish, write the manifest.

    Returns a summary: the slice's shard range, shards done before and after,
    rows fetched and rows per second of the fetch.
    """
    output.mkdir(parents=True, exist_ok=True)
    plan = stage(source, input_path, output, settings, image_root)
    first, end = shard_range(plan["num_shards"], slice_index, slice_count)
    summary = {"output": str(output), "slice": f"{slice_index}/{slice_count}",
               "shards": [first, end], "mode": plan["mode"], "rows_fetched": 0, "seconds": 0.0}
    if stage_only:
        summary["staged_shards"] = plan["num_shards"]
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
        summary["rows_fetched"] = sum(planned_rows(plan, int(name)) for name in todo)
        slice_file = write_slice_input(output, first, end)
        started = time.perf_counter()
        if plan["mode"] == MODE_PACK:
            from pipeline.pack import pack_shards
            pack_shards(slice_file, work, first, settings, settings["processes"])
        else:
            run_img2dataset(slice_file, work, first, settings)
        summary["seconds"] = round(time.perf_counter() - started, 3)
        summary["rows_per_second"] = round(summary["rows_fetched"] / max(summary["seconds"], 1e-9), 1)
        publish(output, work, names)
    unfinished = [n + SHARD_SUFFIX for n in names if not _finished(output, n)]
    summary["unfinished"] = unfinished
    manifest = write_manifest(output)
    summary["manifest"] = {k: manifest[k] for k in ("complete", "total_samples", "accounted")}
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.download",
        description="Download (or pack) one pretraining source into WebDataset shards with a manifest.")
    parser.add_argument("--source", required=True, choices=sorted(ADAPTERS))
    parser.add_argument("--input", required=True, type=Path, help="the source's list file")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        index, count = parse_slice(args.slice)
        overrides = {k: getattr(args, k) for k in ("processes", "threads", "image_size", "resize_mode",
                                                    "encode_quality", "number_sample_per_shard",
                                                    "timeout", "retries")}
        settings = load_settings(args.config, overrides)
        summary = run(args.source, args.input, args.output, settings, index, count,
                      args.image_root, args.stage_only)
    except (DownloadError, OSError, ValueError) as err:
        print(f"pipeline.download: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    if summary.get("unfinished"):
        print(f"pipeline.download: {len(summary['unfinished'])} shard(s) unfinished; "
              f"re-run the same command to resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # img2dataset starts a spawn pool: nothing may run on import
    sys.exit(main())
