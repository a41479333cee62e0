"""`make demo`: the whole system on built-in data, every step the production code path.

1. generate compositional image-caption pairs and a held-out split (demo/make_data.py);
2. serve the images on 127.0.0.1 and download them with the real download stage
   (img2dataset), including broken URLs that must show up in the manifest;
3. pretrain a tiny ALBEF with `deepspeed` on 2 CPU ranks, ZeRO-2, from those shards;
4. zero-shot retrieval on the held-out split (R@1/5/10 against chance), the loss
   curves and a grid of text queries with their top retrieved images as PNGs.

Each step is a subprocess running the same command a user would type; the
commands are printed so they can be re-run by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from demo.make_data import make
from model.engine.config import load_config
from model.engine.dist_env import free_port
from pipeline.serve_images import serve_folder

ROOT = Path(__file__).resolve().parent.parent
# URLs that must fail, one per failure reason the download stage accounts for.
BROKEN_ROUTES = ("404/gone.jpg", "notimage/bytes.jpg", "noai/{image}", "slow/{image}")


def sh(cmd: list[str], **kw) -> None:
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, **kw)


def model_overrides(config: str, extra: list[str] = ()) -> list[str]:
    """The pretraining config's model section (with the run's own `model.*` overrides) as dotted
    overrides, so that retrieval scores the model that was trained (e.g. `configs/small.yaml`'s 64 px
    and mean-pooled ITC text feature), whatever `configs/demo_retrieval.yaml` says; `retrieval` stays
    the evaluation config's."""
    def flat(node: dict, prefix: str):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}.{key}")
            elif key != "retrieval":
                yield f"{prefix}.{key}={json.dumps(value)}"
    return list(flat(load_config(ROOT / config, extra)["model"], "model"))


def write_url_list(data: Path, base_url: str) -> Path:
    """CC3M's native format (caption TAB url) for the training images, plus the broken rows."""
    rows = json.loads((data / "train.json").read_text())
    lines = [f"{r['caption']}\t{base_url}/{r['image']}" for r in rows]
    for route in BROKEN_ROUTES:
        lines.append(f"a broken row\t{base_url}/{route.format(image=rows[0]['image'])}")
    path = data / "train_urls.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--train-pairs", type=int, default=3000)
    ap.add_argument("--test-pairs", type=int, default=200)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--deepspeed-config", default="ds_configs/zero2_cpu.json")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides for the training config")
    args = ap.parse_args(argv)
    out: Path = args.out.resolve()
    data, shards, run = out / "data", out / "shards", out / "run"
    python = sys.executable
    started = time.time()
    for folder in (data, shards, run):  # each demo starts afresh: pretraining refuses a folder with checkpoints
        shutil.rmtree(folder, ignore_errors=True)

    print(f"[demo 1/4] generating {args.train_pairs} training pairs and {args.test_pairs} held-out pairs", flush=True)
    print(json.dumps(make(data, args.train_pairs, args.test_pairs)))

    print("[demo 2/4] serving the images on 127.0.0.1 and downloading them with img2dataset", flush=True)
    with serve_folder(data, slow_seconds=5.0) as base_url:
        urls = write_url_list(data, base_url)
        sh([python, "-m", "pipeline.download", "--source", "cc3m", "--input", str(urls),
            "--output", str(shards), "--image-size", "64", "--samples-per-shard", "500",
            "--processes", "2", "--threads", "16", "--timeout", "2", "--retries", "0"])
    manifest = json.loads((shards / "manifest.json").read_text())
    print(json.dumps({"samples": manifest["total_samples"], "reasons": manifest["reasons"]}, indent=1))

    print("[demo 3/4] pretraining a tiny ALBEF: deepspeed, 2 CPU ranks, ZeRO-2", flush=True)
    deepspeed = str(Path(python).parent / "deepspeed")
    # a free rendezvous port: another job on this machine may hold DeepSpeed's default 29500
    sh([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "model/train.py", "--config", args.config,
        "--deepspeed_config", args.deepspeed_config, "--output-dir", str(run),
        f"data.shards={shards}/*.tar", f"train.eval_annotation={data / 'test.json'}",
        f"train.eval_image_root={data}", *args.overrides])

    print("[demo 4/4] zero-shot retrieval on the held-out split, plots", flush=True)
    result = run / "retrieval_demo.json"
    sh([python, "-m", "model.evaluate", "--checkpoint", str(run / "export" / "albef.pth"),
        "--config", "configs/demo_retrieval.yaml", "--device", "cpu", "--output", str(result), "--save-scores",
        f"data.test_file={data / 'test.json'}", f"data.image_root={data}",
        *model_overrides(args.config, [o for o in args.overrides if o.startswith("model.")])])
    sh([python, "-m", "model.plot", str(run)])
    sh([python, "-m", "model.tasks.retrieval_grid", "--scores", str(result.with_suffix(".npz")),
        "--annotations", str(data / "test.json"), "--image-root", str(data),
        "--out", str(run / "plots" / "retrieval_grid.png")])

    metrics = json.loads(result.read_text())["metrics"]
    chance = 100.0 / args.test_pairs
    summary = {"seconds": round(time.time() - started), "chance_r1": chance, "metrics": metrics,
               "download_reasons": manifest["reasons"], "plots": sorted(str(p) for p in (run / "plots").glob("*.png"))}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\n[demo] done in {summary['seconds']} s: TR@1 {metrics['txt_r1']:.1f} and IR@1 {metrics['img_r1']:.1f} "
          f"against chance {chance:.1f}; plots in {run / 'plots'}", flush=True)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
