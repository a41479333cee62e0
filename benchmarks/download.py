"""Download-stage throughput: rows/s of `python -m pipeline.download` against a local server,
and of packing the same images from disk, against the CPU ceiling of the same run, as one JSON.

    python benchmarks/download.py [--rows 2000] [--processes 2] [--threads 64]

The served images are photo-like JPEGs (noise over gradients, 640x480, about
the size of a CC3M original) so decoding, resizing to 384 and re-encoding cost
what they cost on real data; the network is loopback, so this measures the CPU
cost of the stage, not a prediction of a web download (bounded by remote
servers' latency, which threads hide). Rows repeat a pool of distinct images
under distinct query strings.

The ceiling is the work no download can skip, timed in the same run: decode,
resize to the configured size and re-encode with img2dataset's `Resizer` (the
stage's own settings), plus the sha256 of the original bytes, on `--processes`
warm processes with the images already in memory. `download_vs_ceiling` and
`pack_vs_ceiling` are the stages' rows/s over it. CPU seconds per row come
from getrusage: the stage's (its process and every child it waited for) and
the local server's (this process's CPU while the stage ran: the server
threads are all that run here then). The server shares the cores with the
stage, which a remote server would not.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
sys.path.insert(0, str(REPO))

from pipeline.download import DEFAULT_CONFIG, load_settings  # noqa: E402
from pipeline.serve_images import serve_folder  # noqa: E402


def make_images(folder: Path, count: int, width: int, height: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        ramp = np.linspace(0, 255, width)[None, :, None] * rng.random(3)[None, None, :]
        pixels = np.clip(ramp + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        name = f"photo{i:03d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=90)
        names.append(name)
    return names


# --------------------------------------------------------------------------- the ceiling
_IMAGES: list[bytes] = []
_RESIZER = None


def _ceiling_init(paths: list[str], settings: dict) -> None:
    """Worker start: the images in memory, the stage's Resizer, one warm-up call."""
    global _RESIZER
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from pipeline.pack import make_resizer
    _IMAGES[:] = [Path(p).read_bytes() for p in paths]
    _RESIZER = make_resizer(settings)
    _RESIZER(io.BytesIO(_IMAGES[0]))


def _ceiling_ready(_: int) -> None:
    time.sleep(0.2)  # holds each worker long enough for every one to have started


def _ceiling_rows(rows: range) -> tuple[int, float]:
    """Decode + resize + encode + sha256 of rows `rows` (cycling over the images): successes, CPU s."""
    done, cpu = 0, time.process_time()
    for i in rows:
        data = _IMAGES[i % len(_IMAGES)]
        image, *_, error = _RESIZER(io.BytesIO(data))
        hashlib.sha256(data).hexdigest()
        done += error is None and image is not None
    return done, time.process_time() - cpu


def measure_ceiling(paths: list[Path], rows: int, processes: int, settings: dict) -> dict:
    """Rows/s of the per-image work alone on `processes` warm processes (spawn, like the stage),
    and its CPU ms per row (the workers' own CPU time: what another load on the cores does not change)."""
    chunks = [range(k, rows, processes * 4) for k in range(processes * 4)]
    with get_context("spawn").Pool(processes, _ceiling_init, ([str(p) for p in paths], settings)) as pool:
        pool.map(_ceiling_ready, range(processes), chunksize=1)
        started = time.perf_counter()
        results = pool.map(_ceiling_rows, chunks, chunksize=1)
        seconds = time.perf_counter() - started
    done = sum(n for n, _ in results)
    if done != rows:
        raise SystemExit(f"ceiling: {rows - done} of {rows} images failed to resize")
    return {"rows_per_s": rows / seconds, "seconds": seconds,
            "cpu_ms_per_row": 1000 * sum(c for _, c in results) / rows}


# --------------------------------------------------------------------------- the stages
def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def adopt_orphans() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux), so their CPU is counted.

    The stage's forkserver (and the workers it reaps) outlives the stage's
    main process by a moment and is nobody's waited-for child otherwise.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def children() -> set[int]:
    """Pids of this process's children (Linux /proc)."""
    me, found = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:   # gone meanwhile
            continue
        if int(fields[1]) == me:
            found.add(int(stat.parent.name))
    return found


def reap_orphans(keep: set[int], deadline_s: float = 60.0) -> None:
    """Wait for every adopted descendant to exit (their rusage then joins RUSAGE_CHILDREN), but
    not for children that were there before (multiprocessing's resource tracker lives on: waiting
    for it cost the full deadline)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        waiting = children() - keep
        if not waiting:
            return
        for pid in waiting:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.05)


def run_stage(args: list[str]) -> dict:
    """One `python -m pipeline.download` run: its summary, wall time and CPU seconds.

    `stage_cpu_seconds`: the stage's process tree (main, workers, forkserver;
    see `adopt_orphans`); `server_cpu_seconds`: this process meanwhile (the
    local server's threads, when one is running).
    """
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")
    before = children()
    children_cpu, own = _cpu(resource.RUSAGE_CHILDREN), _cpu(resource.RUSAGE_SELF)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.download", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    reap_orphans(keep=before)
    if done.returncode != 0:
        raise SystemExit(f"pipeline.download failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    summary["wall_seconds_with_startup"] = round(wall, 2)
    summary["stage_cpu_seconds"] = round(_cpu(resource.RUSAGE_CHILDREN) - children_cpu, 2)
    summary["server_cpu_seconds"] = round(_cpu(resource.RUSAGE_SELF) - own, 2)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--distinct-images", type=int, default=64)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ceiling-rows", type=int, default=2000,
                        help="rows of each of the two ceiling measurements (before and after the stages)")
    args = parser.parse_args()
    counted = adopt_orphans()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        images.mkdir()
        names = make_images(images, args.distinct_images, args.width, args.height, args.seed)
        mean_kb = np.mean([(images / n).stat().st_size for n in names]) / 1024
        settings = load_settings(DEFAULT_CONFIG, {"processes": args.processes})
        ceiling_rows = min(args.rows, args.ceiling_rows)
        paths = [images / n for n in names]
        ceilings = [measure_ceiling(paths, ceiling_rows, args.processes, settings)]
        common = ["--processes", str(args.processes), "--threads", str(args.threads),
                  "--samples-per-shard", str(args.samples_per_shard)]
        with serve_folder(images) as base:
            tsv = tmp / "cc3m.tsv"
            tsv.write_text("".join(f"caption {i}\t{base}/{names[i % len(names)]}?row={i}\n"
                                   for i in range(args.rows)))
            web = run_stage(["--source", "cc3m", "--input", str(tsv), "--output", str(tmp / "web"),
                             *common])
        ann = tmp / "local.json"
        ann.write_text(json.dumps([{"image": str(images / names[i % len(names)]), "caption": f"c {i}"}
                                   for i in range(args.rows)]))
        local = run_stage(["--source", "coco", "--input", str(ann), "--output", str(tmp / "local"),
                           *common])
        ceilings.append(measure_ceiling(paths, ceiling_rows, args.processes, settings))

    # the mean of a measurement before and one after the stages, against drifting background load
    ceiling = {key: sum(c[key] for c in ceilings) / len(ceilings) for key in ceilings[0]}
    per_row = 1000 / args.rows
    cpu = {"ceiling": ceiling["cpu_ms_per_row"],
           "download_stage": web["stage_cpu_seconds"] * per_row,
           "download_server": web["server_cpu_seconds"] * per_row,
           "pack_stage": local["stage_cpu_seconds"] * per_row}
    print(json.dumps({
        "rows": args.rows, "image": f"{args.width}x{args.height} JPEG, {mean_kb:.0f} KiB",
        "processes": args.processes, "threads": args.threads, "cpus": os.cpu_count(),
        "download_rows_per_s": web["rows_per_second"],
        "download_seconds": web["seconds"],
        "download_wall_seconds_with_startup": web["wall_seconds_with_startup"],
        "pack_rows_per_s": local["rows_per_second"],
        "pack_seconds": local["seconds"],
        "pack_wall_seconds_with_startup": local["wall_seconds_with_startup"],
        "ceiling_rows_per_s": round(ceiling["rows_per_s"], 1),
        "ceiling_rows_per_s_before_after": [round(c["rows_per_s"], 1) for c in ceilings],
        "ceiling_rows": ceiling_rows,
        "ceiling_work": f"decode + resize to {settings['image_size']} ({settings['resize_mode']}) + "
                        f"{settings['encode_format']} q{settings['encode_quality']} + sha256, img2dataset Resizer",
        "download_vs_ceiling": round(web["rows_per_second"] / ceiling["rows_per_s"], 3),
        "pack_vs_ceiling": round(local["rows_per_second"] / ceiling["rows_per_s"], 3),
        "download_vs_pack": round(web["rows_per_second"] / local["rows_per_second"], 3),
        # CPU per row (getrusage): robust to other load on the cores, unlike the rates
        "cpu_ms_per_row": {key: round(value, 2) for key, value in cpu.items()},
        "cpu_of_whole_tree": counted,
        "download_cpu_vs_ceiling": round(cpu["ceiling"] / (cpu["download_stage"] + cpu["download_server"]), 3),
        "download_stage_cpu_vs_ceiling": round(cpu["ceiling"] / cpu["download_stage"], 3),
        "pack_cpu_vs_ceiling": round(cpu["ceiling"] / cpu["pack_stage"], 3),
        "samples": {"download": web["manifest"]["total_samples"], "pack": local["manifest"]["total_samples"]},
    }, indent=2))


if __name__ == "__main__":
    main()
