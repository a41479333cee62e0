"""Single-process probe of ALBEF pretraining dynamics: what docs/COLLAPSE.md measures.

Trains `model.albef.ALBEF` with `model.losses.total_loss` in one process, no
DeepSpeed, on an annotation list (demo/make_data.py or demo/hard_scenes.py
output) and reports, every `--eval-every` steps, the numbers that tell a
collapsed run from a learning one:

- feature spread: mean pairwise cosine (off-diagonal) of the held-out images'
  ITC features and of their captions' features (1.0 = every input maps to the
  same vector), online model and momentum teacher;
- ITC / ITM training accuracy (mean over the window), ITC loss against its
  collapse value ln(batch + queue);
- held-out retrieval: ITC R@1/5/10 (TR, IR) and ITM-reranked R@1 (top 16);
- the temperature, learning rate and alpha.

It simulates the 2-rank run of `deepspeed --num_gpus 2 model/train.py`
faithfully: each step runs `--ranks` forwards of `batch_size_per_rank` (ITC
batch block and ITM negatives per rank, gradients averaged), one EMA step per
optimiser step, the gathered momentum features enqueued once after all of them;
the LR / alpha schedules, the temperature clamp, AdamW groups and the
augmentation are the trainer's and the loader's.

    python -m demo.collapse_probe --data runs/hard/data --config configs/demo.yaml --steps 300 \
        [--eval-every 50] [--out probe.jsonl] [key=value config overrides ...]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from model.albef import ALBEF, text_settings_from_tokenizer
from model.engine.config import load_config
from model.engine.schedule import LRSchedule, alpha_at
from model.losses import total_loss
from model.tasks.retrieval_eval import _metrics, compute_features, itc_similarity, rerank
from pipeline.annotations import RetrievalEvalDataset
from pipeline.captions import pre_caption
from pipeline.tokenize import load_tokenizer, text_batch
from pipeline.transforms import AugmentConfig, ImageTransform, normalize_batch


def mean_pairwise_cosine(feat: torch.Tensor) -> float:
    """Mean off-diagonal cosine of L2-normalised rows (1.0: all rows equal)."""
    n = feat.shape[0]
    sims = feat @ feat.t()
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


class Pairs:
    """The training annotation list decoded once into memory; batches drawn like one epoch-shuffled stream."""

    def __init__(self, data: Path, image_res: int, augment: dict, seed: int):
        rows = json.loads((data / "train.json").read_text())
        self.images = [Image.open(data / r["image"]).convert("RGB") for r in rows]
        for img in self.images:
            img.load()
        self.captions = [pre_caption(r["caption"] if isinstance(r["caption"], str) else r["caption"][0])
                         for r in rows]
        self.transform = ImageTransform(image_res, train=True, augment=AugmentConfig.from_dict(augment))
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def fixed_batch(self, n: int) -> tuple[torch.Tensor, list[str]]:
        """The first n pairs, augmented by a generator of their own (the training stream is untouched)."""
        rng = random.Random(0)
        pixels = [self.transform.pixels(self.images[i], rng) for i in range(n)]
        return normalize_batch(pixels, self.transform.augment.mean, self.transform.augment.std), self.captions[:n]

    def batch(self, n: int) -> tuple[torch.Tensor, list[str]]:
        if len(self.order) < n:
            perm = list(range(len(self.images)))
            self.rng.shuffle(perm)
            self.order = perm
        idx, self.order = self.order[:n], self.order[n:]
        pixels = [self.transform.pixels(self.images[i], self.rng) for i in idx]
        return normalize_batch(pixels, self.transform.augment.mean, self.transform.augment.std), \
            [self.captions[i] for i in idx]


def param_groups(params, weight_decay: float) -> list[dict]:
    """The trainer's AdamW groups (model/engine/trainer.py): no decay on 1-D tensors."""
    decay = [p for p in params if p.ndim != 1]
    no_decay = [p for p in params if p.ndim == 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model, dataset: RetrievalEvalDataset, tokenizer, k_test: int = 16, itm: bool = True) -> dict:
    model.eval()
    f = compute_features(model, dataset, tokenizer, max_tokens=30, image_batch_size=100,
                         text_batch_size=100, device=torch.device("cpu"))
    sims = itc_similarity(f)
    itc = _metrics(dataset, sims.numpy(), sims.t().numpy()).metrics
    if itm:
        s_i2t, s_t2i = rerank(model, f, sims, k_test)
        itm = _metrics(dataset, s_i2t, s_t2i).metrics
    # the teacher's spread, on the same inputs
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    ids, mask = text_batch(tokenizer, dataset.texts, 30)
    img_m = F.normalize(model.vision_proj_m(model.visual_encoder_m(images)[:, 0]), dim=-1)
    txt_m = F.normalize(model.text_proj_m(model._text_summary(model.text_encoder_m.encode(ids, mask), mask)), dim=-1)
    # before the projection: do the encoders' CLS states differ, and how much of the projected
    # vector is the projection's bias (the same for every input)?
    img_cls = model.visual_encoder(images)[:, 0]
    txt_cls = model._text_summary(model.text_encoder.encode(ids, mask), mask)
    diag = {}
    for name, cls, proj in (("img", img_cls, model.vision_proj), ("txt", txt_cls, model.text_proj)):
        diag[f"spread_{name}_cls"] = mean_pairwise_cosine(F.normalize(cls, dim=-1))
        # content part: the projected deviation from the mean CLS state, against the common part
        centred = (cls - cls.mean(0)) @ proj.weight.t()
        common = proj(cls.mean(0, keepdim=True))
        diag[f"content_ratio_{name}"] = float(centred.norm(dim=1).mean() / common.norm())
    diag.update(mlm_grounding(model, tokenizer, images, dataset.texts))
    model.train()
    return {**{k: round(v, 5) for k, v in diag.items()},
            "spread_img": mean_pairwise_cosine(f.image_feat), "spread_txt": mean_pairwise_cosine(f.text_feat),
            "spread_img_m": mean_pairwise_cosine(img_m), "spread_txt_m": mean_pairwise_cosine(txt_m),
            "itc_tr": [itc["txt_r1"], itc["txt_r5"], itc["txt_r10"]],
            "itc_ir": [itc["img_r1"], itc["img_r5"], itc["img_r10"]],
            **({"itm_r1": [itm["txt_r1"], itm["img_r1"]]} if itm else {})}


COLOUR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")


@torch.no_grad()
def mlm_grounding(model, tokenizer, images: torch.Tensor, texts: list[str]) -> dict:
    """MLM accuracy on the colour words of the captions, all of them masked, with each caption's own
    image and with another caption's image: the gap is how much the fusion reads colours from the image."""
    ids, mask = text_batch(tokenizer, texts, 30)
    colour_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(COLOUR_WORDS)))
    chosen = torch.isin(ids, colour_ids)
    if not chosen.any():
        return {}
    masked = ids.masked_fill(chosen, model.settings.text.mask_token_id)
    out = {}
    for name, imgs in (("own", images), ("shuffled", images.roll(1, 0))):
        tokens = model.visual_encoder(imgs)
        states = model.text_encoder.fuse(model.text_encoder.encode(masked, mask), mask, tokens)
        pred = model.text_encoder.mlm_head(states[chosen]).argmax(-1)
        out[f"mlm_colour_acc_{name}"] = float((pred == ids[chosen]).float().mean())
    return out


@torch.no_grad()
def batch_mass(model, pairs: "Pairs", tokenizer, bs: int, max_tokens: int) -> dict:
    """On a fresh training batch (train-mode features, no EMA, no enqueue): the softmax mass the online
    ITC logits put on the current batch block (vs the queue), and the momentum teacher's.
    Uniform = bs / (bs + Q); a model that tells "this step's teacher features" from the queue's puts more."""
    images, caps = pairs.fixed_batch(bs)
    ids, mask = text_batch(tokenizer, caps, max_tokens)
    _, v = model.encode_image(images)
    _, w = model.encode_text(ids, mask)
    _, v_m, w_m = model._momentum_features(images, ids, mask)
    temp = model.temp.float()
    i2t = torch.cat([v @ w_m.t(), v @ model.queue.text_queue], 1) / temp
    t2i = torch.cat([w @ v_m.t(), w @ model.queue.image_queue], 1) / temp
    i2t_m = torch.cat([v_m @ w_m.t(), v_m @ model.queue.text_queue], 1) / temp
    out = {}
    for name, logits in (("i2t", i2t), ("t2i", t2i), ("i2t_teacher", i2t_m)):
        out[f"mass_batch_{name}"] = round(float(logits.softmax(1)[:, :bs].sum(1).mean()), 4)
    # how far the teacher's current text features sit from the queue's (drift since they were enqueued)
    out["cos_teacher_txt_vs_queue"] = round(float((w_m.mean(0) @ model.queue.text_queue.mean(1))
                                                   / (w_m.mean(0).norm() * model.queue.text_queue.mean(1).norm())), 4)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder with train.json, test.json, images/")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ranks", type=int, default=2, help="simulated data-parallel ranks")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--vision-init-std", type=float, help="(experiment) re-init the ViT blocks' Linear weights")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config, args.overrides)
    t, m = cfg["train"], cfg["model"]
    seed = t.get("seed", 42)
    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer = load_tokenizer(m["text"]["tokenizer"])
    m["text"].update(text_settings_from_tokenizer(tokenizer))
    B, R = t["batch_size_per_rank"], args.ranks
    model = ALBEF(m, global_batch_size=B * R)
    if args.vision_init_std:
        with torch.no_grad():
            for mod in model.visual_encoder.blocks.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.normal_(0.0, args.vision_init_std)
        model.copy_online_to_momentum()
    model.train()
    res = m["vision"]["image_res"]
    pairs = Pairs(args.data, res, cfg.get("data", {}).get("augment", {}), seed)
    test = RetrievalEvalDataset(args.data / "test.json", args.data, ImageTransform(res, train=False))
    batches_per_epoch = len(pairs.images) // (B * R)
    total = t["epochs"] * batches_per_epoch
    sched = LRSchedule(lr=t["lr"], warmup_lr=t["warmup_lr"], min_lr=t["min_lr"],
                       warmup_steps=t["warmup_steps"], total_steps=total)
    opt = torch.optim.AdamW(param_groups(model.trainable_parameters(), t["weight_decay"]), lr=t["lr"],
                            betas=tuple(t.get("betas", (0.9, 0.999))), eps=t.get("eps", 1e-8))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, sched.factor)
    weights = {f"loss_{k}": v for k, v in (t.get("loss_weights") or {}).items()}
    gen = torch.Generator().manual_seed(seed)

    # 2-rank semantics: one EMA per step (every rank does the same one), one enqueue of all ranks' features
    real_ema, real_enqueue = model.momentum_update, model.queue.enqueue
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    model.queue.enqueue = lambda i, tx, idx=None: pending.append((i, tx))
    collapse_itc = math.log(B + m["queue_size"])
    print(json.dumps({"config": args.config, "overrides": args.overrides, "B": B, "R": R, "steps": args.steps,
                      "batches_per_epoch": batches_per_epoch, "schedule_steps": total,
                      "itc_collapse_value": round(collapse_itc, 3)}), flush=True)
    records, window, started = [], {}, time.time()
    for step in range(args.steps):
        alpha = alpha_at(step, batches_per_epoch, t["alpha"])
        opt.zero_grad(set_to_none=True)
        for r in range(R):
            model.momentum_update = real_ema if r == 0 else (lambda: None)
            images, caps = pairs.batch(B)
            ids, mask = text_batch(tokenizer, caps, t["max_tokens"])
            out = model(images, ids, mask, alpha=alpha, generator=gen)
            (total_loss(out, weights) / R).backward()
            for k, v in out.items():
                window[k] = window.get(k, 0.0) + float(v.detach()) / R
        opt.step()
        lr_sched.step()
        with torch.no_grad():
            model.temp.clamp_(m["temp_min"], m["temp_max"])
        real_enqueue(torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending]))
        pending.clear()
        window["n"] = window.get("n", 0) + 1
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            n = window.pop("n")
            rec = {"step": step + 1, **{k: round(v / n, 4) for k, v in window.items()},
                   "temp": round(float(model.temp.detach()), 4), "lr": opt.param_groups[0]["lr"], "alpha": round(alpha, 3),
                   **evaluate(model, test, tokenizer, itm=step + 1 == args.steps),
                   **batch_mass(model, pairs, tokenizer, B, t["max_tokens"]), "s": round(time.time() - started)}
            rec = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}
            records.append(rec)
            window = {}
            print(json.dumps(rec), flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with args.out.open("a") as fh:
                    fh.write(json.dumps({"overrides": args.overrides, **rec}) + "\n")
    return records


if __name__ == "__main__":
    main()
