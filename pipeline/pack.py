"""Pack image files already on disk (COCO, Visual Genome) into the download stage's shards.

No HTTP: each file is read, resized and re-encoded by img2dataset's own
`Resizer`, written by its `WebDatasetSampleWriter` and summed up by its
`write_stats`, with img2dataset's key scheme. A packed folder is therefore
indistinguishable from a downloaded one: `KEY.jpg`, `KEY.txt` (caption),
`KEY.json` (url = the file path, caption, source, size, sha256), a per-shard
`.parquet` of every row and `<shard>_stats.json`. A file that is missing,
empty, unreadable or not an image is skipped and counted under its reason.

Called by `pipeline.download` when a source's rows are paths, not URLs.
"""
from __future__ import annotations

import hashlib
import io
import math
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import worker_pool
from pipeline.manifest import STATS_SUFFIX, shard_name

with worker_pool.torch_hidden():   # img2dataset without torch: half its import time (pipeline/worker_pool.py)
    from img2dataset.downloader import compute_key
    from img2dataset.logger import CappedCounter, write_stats
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

EMPTY_FILE = "empty file"
READ_FAILED = "file not readable"

# the per-sample metadata img2dataset writes for a parquet input with a
# `source` column, exif off and sha256 on
SCHEMA = pa.schema([
    ("source", pa.string()), ("caption", pa.string()), ("url", pa.string()),
    ("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("sha256", pa.string()),
])


def make_resizer(settings: dict) -> Resizer:
    return Resizer(
        image_size=settings["image_size"],
        resize_mode=settings["resize_mode"],
        resize_only_if_bigger=settings["resize_only_if_bigger"],
        encode_format=settings["encode_format"],
        encode_quality=settings["encode_quality"],
    )


def _read(path: str) -> tuple[bytes | None, str | None]:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return None, f"{READ_FAILED}: {err}"
    if not data:
        return None, EMPTY_FILE
    return data, None


def pack_shard(shard_id: int, rows: list[tuple[str, str, str]], work_dir: str, settings: dict) -> None:
    """Write one shard (tar, parquet, then stats) of (path, caption, source) rows into `work_dir`."""
    start = time.time()
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    digits = settings["shard_name_digits"]
    oom_sample = math.ceil(math.log10(settings["number_sample_per_shard"]))
    resizer = make_resizer(settings)
    writer = WebDatasetSampleWriter(shard_id, work_dir, True, digits, SCHEMA, settings["encode_format"])
    status = CappedCounter()
    successes = failed_read = failed_resize = 0
    for index, (path, caption, source) in enumerate(rows):
        key = compute_key(index, shard_id, oom_sample, digits)
        meta = {name: None for name in SCHEMA.names}
        meta.update(source=source, caption=caption, url=path, key=key)
        data, error = _read(path)
        image = None
        if error is not None:
            failed_read += 1
            meta.update(status="failed_to_download", error_message=error)
        else:
            image, width, height, original_width, original_height, error = resizer(io.BytesIO(data))
            if error is not None:
                failed_resize += 1
                meta.update(status="failed_to_resize", error_message=error)
            else:
                successes += 1
                meta.update(status="success", width=width, height=height,
                            original_width=original_width, original_height=original_height,
                            sha256=hashlib.sha256(data).hexdigest())
        status.increment(meta["status"] if error is None else error)
        writer.write(image, key, caption, meta)
    writer.close()
    write_stats(work_dir, shard_id, len(rows), successes, failed_read, failed_resize,
                start, time.time(), status, digits)


def _pack_shard_logged(args) -> bool:
    """Pool task: a shard that fails is reported and left unfinished (no stats), not raised."""
    shard_id = args[0]
    try:
        pack_shard(*args)
        return True
    except Exception:  # noqa: BLE001 - one bad shard must not stop the others
        traceback.print_exc()
        print(f"pack: shard {shard_id} failed; re-run to retry it", flush=True)
        return False


def pack_shards(slice_file: str | Path, work_dir: str | Path, first_shard: int,
                settings: dict, processes: int) -> None:
    """Pack the rows of `slice_file` into shards `first_shard`, `first_shard + 1`, ...

    Shards whose stats already exist in `work_dir` are skipped (resume).
    """
    work_dir = Path(work_dir)
    per_shard = settings["number_sample_per_shard"]
    table = pq.read_table(slice_file, columns=["url", "caption", "source"])
    tasks = []
    for j in range(math.ceil(table.num_rows / per_shard)):
        shard_id = first_shard + j
        if (work_dir / f"{shard_name(shard_id, settings['shard_name_digits'])}{STATS_SUFFIX}").exists():
            continue
        part = table.slice(j * per_shard, per_shard).to_pydict()
        rows = list(zip(part["url"], part["caption"], part["source"]))
        tasks.append((shard_id, rows, str(work_dir), settings))
    if not worker_pool.pool_needed(processes, len(tasks)):
        for task in tasks:
            _pack_shard_logged(task)
        return
    # workers forked from a preloaded forkserver: no ~6 s re-import of img2dataset per worker
    with ProcessPoolExecutor(max_workers=processes, mp_context=worker_pool.worker_context()) as pool:
        list(pool.map(_pack_shard_logged, tasks))
