"""Retrieval fine-tuning inside a DeepSpeed engine: the reference's Retrieval.py recipe.

    deepspeed [--num_gpus N] model/retrieval.py finetune --config configs/retrieval_coco.yaml \
        --checkpoint ALBEF_4M.pth --deepspeed_config ds_configs/zero2.json [--output-dir DIR] [k=v ...]

- Model: ALBEF in retrieval mode (`idx` = image number): ITC targets spread
  over every caption of the same image, in the batch and in `idx_queue`; ITM
  hard negatives never share the image; momentum distillation with alpha
  ramped from 0 over the first epoch (`alpha * min(1, i / batches_per_epoch)`);
  no MLM. Weights from `--checkpoint` (position embedding resized to 384).
- Data: the Karpathy train file(s) as a map-style dataset, split over ranks by
  a `DistributedSampler` (shuffled per epoch, padded so every rank has the
  same number of full batches, `drop_last` batches as the reference).
  Augmentation: RandomResizedCrop(scale 0.5-1.0), flip, RandAugment.
- Optimiser and schedule: AdamW (lr 1e-5, weight decay 0.02, none on biases
  and 1-D parameters), cosine from lr to min_lr. The reference steps its
  cosine once per epoch; we step it every optimiser step, as the pretraining
  trainer does (`model/schedule.py`).
- After every epoch: full evaluation (ITC top-k + ITM re-ranking) on val and
  test; the epoch with the best val `r_mean` (test when there is no val file)
  is exported in the released layout to `<out>/export/albef.pth`, with its
  test result JSON beside it. Per-epoch results: `<out>/logs/epochs.jsonl`;
  losses: `<out>/logs/metrics.csv` and TensorBoard; annotation problems:
  `<out>/logs/train_problems.json`; images that failed to decode while
  training (each replaced by the next entry): `<out>/logs/load_failures_rank{R}.jsonl`.

Helpers shared with pretraining come from `model/train.py` (optimiser groups,
seeding, DeepSpeed start-up workaround), `model/engine_config.py`,
`model/schedule.py`, `model/progress.py` and `model/export.py`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from model.dist_env import apply_slurm_env, init_engine_process_group

LOSS_KEYS = ("loss", "loss_itc", "loss_itm", "acc_itc", "acc_itm")


def finetune(args: argparse.Namespace) -> int:
    return RetrievalFinetuner(args).run()


class RetrievalFinetuner:
    def __init__(self, args: argparse.Namespace):
        apply_slurm_env()
        import deepspeed

        from model.albef import ALBEF
        from model.config import save_config
        from model.engine_config import BatchPlan, load_ds_config, resolve_ds_config, zero_stage
        from model.retrieval import eval_dataset, load_retrieval_config
        from model.retrieval_weights import load_retrieval_weights, retrieval_model_config
        from model.schedule import LRSchedule
        from model.train import param_groups, seed_everything, vectorise_scalar_params
        from pipeline.annotations import RetrievalTrainDataset, TrainCollate
        from pipeline.tokenize import load_tokenizer
        from pipeline.transforms import AugmentConfig, ImageTransform

        self.cfg = cfg = load_retrieval_config(args.config, args.overrides)
        tcfg, dcfg = cfg["train"], cfg["data"]
        if not dcfg["train_file"]:
            raise ValueError("data.train_file is empty: give the Karpathy train annotation file(s)")
        self.config_name = Path(args.config).stem
        self.rank, self.world, self.device = init_engine_process_group(args.local_rank, tcfg["dist_timeout_s"])
        self.use_cuda = self.device.type == "cuda"
        self.out_dir = Path(args.output_dir or tcfg["output_dir"])

        self.plan = BatchPlan(micro_batch=tcfg["batch_size_per_rank"],
                              grad_accum=tcfg["gradient_accumulation_steps"],
                              world_size=self.world, queue_size=cfg["model"]["queue_size"])
        ds_cfg = resolve_ds_config(load_ds_config(args.deepspeed_config), self.plan,
                                   source=str(args.deepspeed_config))
        self.zero_stage = zero_stage(ds_cfg)

        res = cfg["model"]["vision"]["image_res"]
        self.train_set = RetrievalTrainDataset(
            dcfg["train_file"], dcfg["image_root"],
            ImageTransform(res, train=True, augment=AugmentConfig.from_dict(dcfg["augment"])),
            max_words=dcfg["max_words"], seed=tcfg["seed"])
        self.eval_sets = {split: eval_dataset(cfg, split) for split in ("val", "test") if dcfg[f"{split}_file"]}
        if not self.eval_sets:
            raise ValueError("neither data.val_file nor data.test_file is set: nothing to select the model by")

        seed_everything(tcfg["seed"])
        self.tokenizer = load_tokenizer(cfg["model"]["text"]["tokenizer"])
        cfg["model"] = retrieval_model_config(cfg, self.tokenizer)
        model = ALBEF(cfg["model"], global_batch_size=self.plan.enqueue_batch)
        self.load_report, self.source = load_retrieval_weights(model, args.checkpoint)
        seed_everything(tcfg["seed"] + self.rank)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(tcfg["seed"] + self.rank)

        self.sampler = DistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank,
                                          shuffle=True, seed=tcfg["seed"])
        self.loader = DataLoader(self.train_set, batch_size=self.plan.micro_batch, sampler=self.sampler,
                                 num_workers=dcfg["num_workers"], drop_last=True, pin_memory=self.use_cuda,
                                 collate_fn=TrainCollate(self.tokenizer, tcfg["max_tokens"]))
        self.batches_per_epoch = len(self.loader)
        if self.batches_per_epoch < self.plan.grad_accum:
            raise ValueError(
                f"{len(self.train_set)} training pairs give {self.batches_per_epoch} full batches of "
                f"{self.plan.micro_batch} per rank over {self.world} ranks, fewer than "
                f"train.gradient_accumulation_steps {self.plan.grad_accum}")
        self.total_steps = tcfg["epochs"] * self.batches_per_epoch // self.plan.grad_accum
        schedule = LRSchedule(lr=tcfg["lr"], warmup_lr=tcfg["warmup_lr"], min_lr=tcfg["min_lr"],
                              warmup_steps=tcfg["warmup_steps"], total_steps=self.total_steps)
        optimizer = torch.optim.AdamW(param_groups(model.trainable_parameters(), tcfg["weight_decay"]),
                                      lr=tcfg["lr"], betas=tuple(tcfg["betas"]), eps=tcfg["eps"])
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
        self.scalar_params = vectorise_scalar_params(model)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    lr_scheduler=lr_scheduler, config=ds_cfg)
        self.module = self.engine.module
        self.module.sync_buffers()
        self.failure_log = self.out_dir / "logs" / f"load_failures_rank{self.rank}.jsonl"
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
            (self.out_dir / "ds_config.json").write_text(json.dumps(ds_cfg, indent=2) + "\n")
            (self.out_dir / "logs").mkdir(exist_ok=True)
        dist.barrier()

    # ------------------------------------------------------------------ training

    def _train_epoch(self, epoch: int, metrics_log, step: int, micro_step: int) -> tuple[dict, int, int]:
        from model.progress import Throughput, peak_memory_mb, progress_line
        from model.schedule import alpha_at

        tcfg = self.cfg["train"]
        accum = self.plan.grad_accum
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        self.engine.train()
        throughput = Throughput()
        sums: dict[str, float] = {}
        window: dict[str, float] = {}
        load_failures = 0
        t_wait = time.perf_counter()
        for batch in self.loader:
            throughput.add_wait(time.perf_counter() - t_wait)
            if batch["load_failures"]:
                load_failures += len(batch["load_failures"])
                with self.failure_log.open("a") as f:
                    for failure in batch["load_failures"]:
                        f.write(json.dumps({"epoch": epoch, **failure}) + "\n")
            alpha = alpha_at(micro_step, self.batches_per_epoch, tcfg["alpha"])
            out = self.engine(batch["image"].to(self.device, non_blocking=True),
                              batch["input_ids"].to(self.device, non_blocking=True),
                              batch["attention_mask"].to(self.device, non_blocking=True),
                              alpha=alpha, idx=batch["idx"].to(self.device, non_blocking=True),
                              generator=self.generator)
            self.engine.backward(out["loss"])
            lr = self.engine.get_lr()[0]
            self.engine.step()
            micro_step += 1
            for key in LOSS_KEYS:
                value = float(out[key].detach())
                sums[key] = sums.get(key, 0.0) + value
                window[key] = window.get(key, 0.0) + value
            window["n"] = window.get("n", 0.0) + 1
            if micro_step % accum == 0:
                step += 1
                throughput.add_step(self.plan.global_batch)
                if step % tcfg["log_every"] == 0 or step == self.total_steps:
                    scalars = self._mean_over_ranks(window)
                    scalars.update(throughput.summary(), lr=lr, alpha=alpha, epoch=epoch,
                                   peak_mem_mb=peak_memory_mb(self.device))
                    throughput.reset()
                    window = {}
                    if self.rank == 0:
                        print("[finetune] " + progress_line(step, self.total_steps, epoch, scalars), flush=True)
                        metrics_log.write(step, scalars)
            t_wait = time.perf_counter()
        stats = self._mean_over_ranks({**sums, "n": float(self.batches_per_epoch)})
        failures = torch.tensor([load_failures], dtype=torch.float64, device=self.device)
        dist.all_reduce(failures)
        stats["image_load_failures"] = int(failures.item())
        return stats, step, micro_step

    def _mean_over_ranks(self, sums: dict[str, float]) -> dict[str, float]:
        n = sums.pop("n", 1.0)
        keys = sorted(sums)
        means = torch.tensor([sums[k] / n for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(means)
        return dict(zip(keys, (means / self.world).tolist()))

    # ------------------------------------------------------------------ evaluation and export

    def _evaluate(self, epoch: int) -> dict:
        from model.retrieval import result_record, run_evaluation
        from model.retrieval_metrics import format_table

        records = {}
        for split, dataset in self.eval_sets.items():
            result, timings, _ = run_evaluation(self.module, dataset, self.tokenizer, self.cfg, self.device)
            records[split] = result_record(result, dataset, timings, init_checkpoint=self.source,
                                           config=self.config_name, split=split, epoch=epoch,
                                           k_test=self.cfg["eval"]["k_test"], world_size=self.world)
            if self.rank == 0:
                print(format_table(result.metrics, f"ep {epoch} {split}"), flush=True)
        return records

    def run(self) -> int:
        from model.export import EXPORT_NAME, export_engine
        from model.progress import MetricsLog

        tcfg = self.cfg["train"]
        metrics_log = MetricsLog(self.out_dir / "logs", None) if self.rank == 0 else None
        if self.rank == 0:
            print(f"[finetune] {self.load_report}", flush=True)
            problems = self.train_set.problems
            if problems:
                print(f"[finetune] train annotation problems: {len(problems)} entries left out or "
                      f"merged (see logs/train_problems.json)", flush=True)
            (self.out_dir / "logs" / "train_problems.json").write_text(json.dumps(problems))
            print(f"[finetune] {len(self.train_set)} pairs / {self.train_set.n_images} images; world "
                  f"{self.world} x micro batch {self.plan.micro_batch} x accum {self.plan.grad_accum}; "
                  f"{self.batches_per_epoch} batches/rank/epoch; {self.total_steps} steps; "
                  f"ZeRO-{self.zero_stage}", flush=True)
        select_split = "val" if "val" in self.eval_sets else "test"
        best, step, micro_step = None, 0, 0
        epochs_log = self.out_dir / "logs" / "epochs.jsonl"
        for epoch in range(tcfg["epochs"]):
            train_stats, step, micro_step = self._train_epoch(epoch, metrics_log, step, micro_step)
            records = self._evaluate(epoch)
            score = records[select_split]["metrics"]["r_mean"]
            improved = best is None or score > best
            if improved:
                best = score
                export_engine(self.engine, self.cfg, step, epoch, self.out_dir / "export", self.zero_stage,
                              self.scalar_params)
            if self.rank == 0:
                with epochs_log.open("a") as f:
                    f.write(json.dumps({"epoch": epoch, "step": step, "train": train_stats,
                                        **{split: r["metrics"] for split, r in records.items()},
                                        "best": improved}) + "\n")
                if improved:
                    for split, record in records.items():
                        path = self.out_dir / "export" / f"{Path(EXPORT_NAME).stem}.{self.config_name}_{split}.json"
                        path.write_text(json.dumps(record) + "\n")
        if self.rank == 0:
            metrics_log.close()
            print(f"[finetune] done: best {select_split} r_mean {best:.2f}; "
                  f"{self.out_dir / 'export' / EXPORT_NAME}", flush=True)
        dist.barrier()
        return 0
