"""`manifest.json` beside the shards: samples per shard, totals, and what happened to every input row.

The loaders size epochs from it without opening a tar; people read it to know
what a download lost and why. It is rebuilt from the folder's own files:

- `_staging/plan.json` (written by `pipeline.download`): the source, the input
  rows, the rows its adapter rejected by reason, the shard count and size;
- `<shard>_stats.json` per finished shard (img2dataset's, or `pipeline.pack`'s in
  the same format): rows per outcome, `status_dict` of messages.

A shard is finished when both its `.tar` and its `_stats.json` exist
(img2dataset writes the stats only once a shard is complete). Other planned
shards are listed as unfinished and their rows counted as `unfinished_shard`,
never as samples. `reasons` sums to `rows.input`, which `accounted` states.

Manifest fields (version 1):
    version, source, complete (bool), total_samples,
    shards {"00000.tar": samples, ...} (finished shards, in order),
    unfinished_shards [names], rows {input, rejected_by_adapter,
    in_finished_shards, in_unfinished_shards}, outcomes {success,
    failed_to_download, failed_to_resize, unrecorded, rejected_by_adapter,
    unfinished_shard}, reasons {reason: rows}, errors {message: rows},
    accounted (bool), settings {...}.

`python -m pipeline.manifest DIR` rewrites DIR/manifest.json (e.g. as the last
step after a Slurm array of download slices). It is also how a folder that
img2dataset made outside this project (webdataset output: `00000.tar`,
`00000_stats.json`, ...) becomes loadable: without a plan, the shards are
those with a tar and stats, and every row they count is an input row, so
samples per shard are what the download stage would have recorded (rows that
img2dataset was never given cannot be known and are not counted).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import threading
from collections import Counter
from pathlib import Path

import fsspec

from pipeline.remote import Remote, open_remote, redact

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
STAGING_DIR = "_staging"
PLAN_NAME = "plan.json"
STATS_SUFFIX = "_stats.json"
SHARD_SUFFIX = ".tar"
REJECT_PREFIX = "rejected:"
UNFINISHED = "unfinished_shard"
UNRECORDED = "unrecorded"
ERRORS_KEPT = 100
REBUILD_ATTEMPTS = 5
STATS_FIELDS = ("count", "successes", "failed_to_download", "failed_to_resize")

# img2dataset's error messages (and pack's) -> reason; first match wins.
REASON_PATTERNS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^success$"), "success"),
    (re.compile(r"X-Robots-Tag"), "x_robots_tag"),
    (re.compile(r"HTTP Error (\d+)"), "http_{0}"),
    (re.compile(r"timed out|timeout", re.I), "timeout"),
    (re.compile(r"decoding error|cannot identify image|not an image", re.I), "not_an_image"),
    (re.compile(r"empty file"), "empty_file"),
    (re.compile(r"No such file or directory|Is a directory"), "file_missing"),
    (re.compile(r"Permission denied"), "file_unreadable"),
    (re.compile(r"hash mismatch"), "hash_mismatch"),
    (re.compile(r"too small|too large"), "filtered_by_size"),
    (re.compile(r"SSL|CERTIFICATE", re.I), "ssl_error"),
    (re.compile(r"urlopen error|Connection|Remote end closed|Name or service|"
                r"Temporary failure in name resolution", re.I), "connection_error"),
]
OTHER_REASON = "other"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def reason_of(message: str) -> str:
    """Group one img2dataset status message (success or error text) under a short reason."""
    for pattern, reason in REASON_PATTERNS:
        match = pattern.search(message)
        if match:
            return reason.format(*match.groups())
    return OTHER_REASON


def shard_name(shard_id: int, digits: int) -> str:
    return f"{shard_id:0{digits}d}"


def _read_json_file(path: Path):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def read_stats(path: Path) -> dict | None:
    """A shard's stats, or None when the file is cut short or lacks a field (shard unfinished)."""
    try:
        stats = _read_json_file(path)
        if all(isinstance(stats.get(k), int) for k in STATS_FIELDS) and \
                isinstance(stats.get("status_dict"), dict):
            return stats
    except (OSError, ValueError):
        pass
    return None


def planned_rows(plan: dict, shard_id: int) -> int:
    """Rows staged for shard `shard_id` of a download plan (the last shard may be short)."""
    per_shard = plan["settings"]["number_sample_per_shard"]
    return min(per_shard, plan["rows_accepted"] - shard_id * per_shard)


def build_manifest(folder: str | Path) -> dict:
    """Compute the manifest of a local shard folder from its files (writes nothing)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"shard folder not found: {folder}")
    plan_file = folder / STAGING_DIR / PLAN_NAME
    plan = _read_json_file(plan_file) if plan_file.is_file() else None
    stats_of = {p.name[:-len(STATS_SUFFIX)]: p for p in folder.glob("*" + STATS_SUFFIX)}
    tars = {p.name[:-len(SHARD_SUFFIX)] for p in folder.glob("*" + SHARD_SUFFIX)}
    if plan is not None:
        digits = plan["settings"]["shard_name_digits"]
        planned = [shard_name(k, digits) for k in range(plan["num_shards"])]
    else:  # shards not made by pipeline.download: whatever the folder holds
        planned = sorted(set(stats_of) | tars)

    shards: dict[str, int] = {}
    unfinished: list[str] = []
    outcomes: Counter = Counter()
    reasons: Counter = Counter()
    errors: Counter = Counter()
    rows_finished = rows_unfinished = 0
    for k, name in enumerate(planned):
        stats = read_stats(stats_of[name]) if name in stats_of and name in tars else None
        if stats is None:
            unfinished.append(name + SHARD_SUFFIX)
            if plan is not None:
                rows_unfinished += planned_rows(plan, k)
            continue
        shards[name + SHARD_SUFFIX] = stats["successes"]
        rows_finished += stats["count"]
        outcomes["success"] += stats["successes"]
        outcomes["failed_to_download"] += stats["failed_to_download"]
        outcomes["failed_to_resize"] += stats["failed_to_resize"]
        recorded = 0
        for message, n in stats["status_dict"].items():
            reasons[reason_of(message)] += n
            recorded += n
            if message != "success":
                errors[_ADDRESS.sub("", message)] += n
        # img2dataset drops a sample without a status when its writer raises
        if stats["count"] > recorded:
            reasons[UNRECORDED] += stats["count"] - recorded
            outcomes[UNRECORDED] += stats["count"] - recorded

    rejects = plan["rejects"] if plan is not None else {}
    for reason, n in rejects.items():
        reasons[REJECT_PREFIX + reason] += n
    rejected = sum(rejects.values())
    outcomes["rejected_by_adapter"] = rejected
    outcomes[UNFINISHED] = rows_unfinished
    if rows_unfinished:
        reasons[UNFINISHED] = rows_unfinished
    rows_input = plan["rows_read"] if plan is not None else rows_finished
    return {
        "version": MANIFEST_VERSION,
        "source": plan["source"] if plan is not None else None,
        "complete": not unfinished,
        "total_samples": sum(shards.values()),
        "shards": shards,
        "unfinished_shards": unfinished,
        "rows": {
            "input": rows_input,
            "rejected_by_adapter": rejected,
            "in_finished_shards": rows_finished,
            "in_unfinished_shards": rows_unfinished,
        },
        "outcomes": dict(outcomes),
        "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "errors": dict(errors.most_common(ERRORS_KEPT)),
        "accounted": sum(reasons.values()) == rows_input,
        "settings": plan["settings"] if plan is not None else {},
    }


def temporary_name(path: Path) -> Path:
    """A name beside `path` that no other writer (thread, process, node) uses."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp")


def atomic_write_json(path: str | Path, data) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_manifest(folder: str | Path) -> dict:
    """Rebuild and write `folder/manifest.json`; returns it.

    Slices of one download finishing together may each write it: the build is
    repeated (up to REBUILD_ATTEMPTS times) while shards finish during it, so
    the manifest written last includes every shard finished before it.
    """
    folder = Path(folder)
    for _ in range(REBUILD_ATTEMPTS):
        seen = sorted(p.name for p in folder.glob("*" + STATS_SUFFIX))
        manifest = build_manifest(folder)
        atomic_write_json(folder / MANIFEST_NAME, manifest)
        if sorted(p.name for p in folder.glob("*" + STATS_SUFFIX)) == seen:
            break
    return manifest


def manifest_for_shards(shard_samples: dict[str, int], source: str | None = None) -> dict:
    """A manifest for shards made some other way (generated test shards, the demo).

    `shard_samples` maps shard file names (relative to the folder) to their
    sample counts; every row is taken to be a sample.
    """
    total = sum(shard_samples.values())
    return {
        "version": MANIFEST_VERSION,
        "source": source,
        "complete": True,
        "total_samples": total,
        "shards": dict(shard_samples),
        "unfinished_shards": [],
        "rows": {"input": total, "rejected_by_adapter": 0,
                 "in_finished_shards": total, "in_unfinished_shards": 0},
        "outcomes": {"success": total},
        "reasons": {"success": total} if total else {},
        "errors": {},
        "accounted": True,
        "settings": {},
    }


def _manifest_url(folder_or_url: str | os.PathLike) -> str:
    url = os.fspath(folder_or_url).rstrip("/")
    return url if url.endswith(".json") else f"{url}/{MANIFEST_NAME}"


def read_manifest(folder_or_url: str | os.PathLike, remote: Remote = Remote()) -> dict:
    """Read the manifest of a shard folder: a local path or any fsspec URL
    (`s3://bucket/cc3m`, `file:///data/cc3m`, `memory://x`), or the manifest file itself.
    A remote one is read under `remote`'s timeout and retries (RemoteError when it cannot be)."""
    url = _manifest_url(folder_or_url)
    try:
        if "://" in url and not url.startswith("file://"):
            with open_remote(url, remote) as file:
                text = file.read()
        else:
            with fsspec.open(url, "rb") as file:
                text = file.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard manifest at {redact(url)}: make one with "
                                f"`python -m pipeline.manifest DIR` (or pipeline.download)") from None
    return parse_manifest(text, url)


def parse_manifest(text: str | bytes, url: str) -> dict:
    """A manifest from its JSON text; `url` only names it (redacted) in errors."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"shard manifest {redact(url)} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
        raise ValueError(f"shard manifest {redact(url)} has no 'shards' mapping")
    return manifest


def shard_sizes(folder_or_url: str | os.PathLike) -> dict[str, int]:
    """Samples per finished shard, keyed by the shard's full path or URL
    (`folder_or_url` + "/" + name), in shard order."""
    url = _manifest_url(folder_or_url)
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    return {f"{base}/{name}": n for name, n in read_manifest(url)["shards"].items()}


def format_reasons(reasons: dict[str, int], total: int, title: str) -> str:
    """Rows by reason as an aligned table under `title`, largest first, with shares of `total`."""
    lines = [f"{title}; {total} rows by reason:"]
    width = max((len(r) for r in reasons), default=0)
    for reason, count in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {reason:<{width}}  {count:>9}  {100 * count / max(total, 1):5.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.manifest",
        description="Write DIR/manifest.json from the shard folder's files: after a Slurm array of "
                    "download slices, or to make a folder img2dataset wrote elsewhere loadable.")
    parser.add_argument("folder", help="local shard folder (00000.tar + 00000_stats.json ...)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"pipeline.manifest: shard folder not found: {folder}", file=sys.stderr)
        return 2
    if not (folder / STAGING_DIR / PLAN_NAME).is_file() and not any(folder.glob("*" + STATS_SUFFIX)):
        print(f"pipeline.manifest: {folder} has no img2dataset shards (NNNNN.tar with NNNNN_stats.json; "
              f"img2dataset must run with output_format='webdataset')", file=sys.stderr)
        return 2
    manifest = write_manifest(folder)
    print(format_reasons(manifest["reasons"], manifest["rows"]["input"],
                         f"{folder / MANIFEST_NAME}: {len(manifest['shards'])} shards, "
                         f"{manifest['total_samples']} samples"), file=sys.stderr)
    print(json.dumps({"folder": str(folder), "complete": manifest["complete"],
                      "total_samples": manifest["total_samples"],
                      "shards": len(manifest["shards"]),
                      "unfinished_shards": manifest["unfinished_shards"],
                      "accounted": manifest["accounted"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
