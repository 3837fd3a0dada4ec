"""Training and fine-tuning of any MagLens model from a manifest; the same code runs behind
the app's training dialog, ``maglens train`` and ``torchrun -m app train`` (DDP).

Each model owns its losses (``SlideModel.training_step``); this module owns the loop: one slide
per step with gradient accumulation, flips/quarter turns as augmentation, class weights,
validation each epoch (loss, accuracy, AUROC), cosine annealing, atomic ``last``/``best``
checkpoints, resume, cancel and pause.

Devices: ``TrainConfig.device`` ("auto", "cpu", "cuda", "cuda:N"; see ``engines.devices``)
is resolved before anything else, so a GPU that is asked for but missing fails at once with a
``ValueError`` a user can read. "auto" takes ``cuda:<LOCAL_RANK>`` when torch sees a GPU, else
the CPU. The model moves there after it is built or loaded and before its optimiser is made;
pixels and every tensor a model makes follow the model's device. Under torchrun the process
group uses NCCL for CUDA tensors (gloo beside it for the CPU cancel flag and the gathered
validation rows) and plain gloo on the CPU. Checkpoints hold CPU tensors only and load onto
the CPU, so a run trained on a GPU opens anywhere.

Determinism: every random draw of an epoch (slide order, orientations, and the torch seed the
models sample from) derives from ``(seed, epoch)``, and a mid-epoch stop saves the step and
torch's RNG state (the CPU's, and the GPU's when training on one), so a resumed run continues
exactly as an uninterrupted one on the same device.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from engines import registry
from engines.data import Dataset, Sample, read_manifest
from engines.devices import dist_backend, local_rank, resolve_device
from engines.models.base import StepOutput
from engines.sampling import Orientation, SlideView
from engines.slide import Slide, SlideError

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    manifest: str
    model: str
    preset: str = "tiny"
    out: str = "runs/train"
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    accumulation: int | None = None  # None: the model config's `accumulation`, else 1
    seed: int = 0
    augment: bool = True
    class_weights: bool = True
    scheduler: str = "cosine"  # "cosine" or "none"
    resume: bool = False
    init: str | None = None  # checkpoint to fine-tune from
    freeze_backbone: bool = False
    threads: int | None = None
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N" (engines.devices.resolve_device)
    overrides: dict[str, Any] = field(default_factory=dict)  # model config overrides


@dataclass
class StepEvent:
    epoch: int
    epochs: int
    step: int
    steps: int
    losses: dict[str, float]
    eta_s: float | None


@dataclass
class EpochEvent:
    epoch: int
    metrics: dict[str, float]
    best: bool


@dataclass
class LogEvent:
    message: str


@dataclass
class TrainResult:
    out: Path
    epochs_done: int
    best_metric: float | None
    history: list[dict[str, float]]
    cancelled: bool = False


class TrainControl:
    """Shared between the caller's thread and the loop: cancel and pause flags."""

    def __init__(self) -> None:
        self._cancel = threading.Event()
        self._running = threading.Event()
        self._running.set()

    def cancel(self) -> None:
        self._cancel.set()
        self._running.set()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait_if_paused(self) -> None:
        while not self._running.wait(0.1):
            pass


# ---------------------------------------------------------------------------------------
def auroc(scores: list[float], labels: list[int]) -> float:
    """Binary AUROC by the rank-sum (Mann-Whitney) formula with ties averaged; NaN when
    only one class is present. Written here to avoid a scikit-learn dependency for one
    function."""
    s = np.asarray(scores, float)
    y = np.asarray(labels, int)
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), float)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def macro_auroc(probs: np.ndarray, labels: list[int]) -> float:
    """One-vs-rest AUROC averaged over classes (the positive-class AUROC for two classes)."""
    if probs.shape[1] == 2:
        return auroc(list(probs[:, 1]), labels)
    vals = [auroc(list(probs[:, c]), [int(l == c) for l in labels]) for c in range(probs.shape[1])]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


# ---------------------------------------------------------------------------------------
def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str | torch.device | None = None) -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1).

    ``device`` is where this process trains (a spec for ``resolve_device``, resolved with
    LOCAL_RANK; None: "auto"). On a GPU the group is ``"cpu:gloo,cuda:nccl"``: DDP's gradient
    all-reduce runs on NCCL, while the trainer's own CPU tensors (the cancel flag) and
    ``all_gather_object`` of the validation rows use gloo. On the CPU it is plain gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dev = resolve_device(device, local_rank())
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # before the group: NCCL binds to the current device
        dist.init_process_group(dist_backend(dev))
    return _dist_info()


def _shard(items: list, rank: int, world: int) -> list:
    """This rank's share, padded by repetition so every rank runs the same number of steps
    (ranks must meet at every gradient all-reduce)."""
    if world == 1:
        return items
    per = math.ceil(len(items) / world)
    padded = items + items[: per * world - len(items)]
    return padded[rank::world]


class _StepModule(torch.nn.Module):
    """What DistributedDataParallel wraps: its forward is the model's training step, so
    DDP all-reduces exactly the gradients of the paper's losses."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, view, label: int, epoch: int):
        out = self.model.training_step(view, label, epoch)
        return out.loss, out.logits, out.parts


def _epoch_plan(samples: list[Sample], seed: int, epoch: int, augment: bool) -> tuple[list[Sample], list[Orientation]]:
    rng = np.random.default_rng([seed, epoch])
    order = [samples[i] for i in rng.permutation(len(samples))]
    orients = [Orientation.random(rng) if augment else Orientation() for _ in order]
    return order, orients


def _selection_key(metrics: dict[str, float]) -> float:
    """What ``best`` maximises: validation AUROC, ties (common on a small validation split
    once it is separated perfectly) broken by the lower validation loss; without AUROC, the
    negative loss. The loss enters scaled into the gap between distinct AUROC values."""
    loss = metrics.get("val_loss", metrics.get("train_loss", 0.0))
    auc = metrics.get("val_auroc", float("nan"))
    if math.isnan(auc):
        return -loss
    return auc - 1e-4 * min(loss, 100.0)


class Trainer:
    def __init__(self, cfg: TrainConfig, on_event: Callable[[object], None] | None = None,
                 control: TrainControl | None = None) -> None:
        self.cfg = cfg
        self.on_event = on_event or (lambda e: None)
        self.control = control or TrainControl()
        self.out = Path(cfg.out)
        self.rank, self.world = _dist_info()
        self.device: torch.device | None = None  # resolved at the start of run()

    # -- helpers ---------------------------------------------------------------------
    def _emit(self, event: object) -> None:
        if self.rank == 0:
            self.on_event(event)

    def _log(self, msg: str) -> None:
        log.info(msg)
        self._emit(LogEvent(msg))
        if self.rank == 0:
            with open(self.out / "train.log", "a", encoding="utf-8") as fh:
                fh.write(time.strftime("%H:%M:%S ") + msg + "\n")

    def _build(self, data: Dataset):
        from engines.checkpoint import load_checkpoint, model_from_checkpoint

        resume_ckpt = None
        last = self.out / "last.pt"
        if self.cfg.resume:
            if not last.exists():
                raise FileNotFoundError(f"nothing to resume: {last} does not exist")
            resume_ckpt = load_checkpoint(last)
            model = model_from_checkpoint(resume_ckpt, expect_model=self.cfg.model)
        elif self.cfg.init:
            model = model_from_checkpoint(self.cfg.init, expect_model=self.cfg.model)
            if list(model.classes) != list(data.classes):
                raise ValueError(f"checkpoint classes {model.classes} differ from the manifest's {data.classes}")
        else:
            torch.manual_seed(self.cfg.seed)
            model = registry.create(self.cfg.model, self.cfg.preset, classes=data.classes, **self.cfg.overrides)
        if self.cfg.freeze_backbone:
            for p in model.backbone_parameters():
                p.requires_grad_(False)
        # Before the optimiser exists, so it holds the parameters on the device; a resumed
        # optimiser state (CPU tensors in the file) is then cast onto them by load_state_dict.
        model.to(self.device)
        opt = model.make_optimizer(self.cfg.lr, self.cfg.weight_decay)
        sched = None
        if self.cfg.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.cfg.epochs))
        if resume_ckpt is not None:
            if resume_ckpt.get("optimizer"):
                opt.load_state_dict(resume_ckpt["optimizer"])
            if sched is not None and resume_ckpt.get("scheduler"):
                sched.load_state_dict(resume_ckpt["scheduler"])
        return model, opt, sched, resume_ckpt

    def _cancel_agreed(self) -> bool:
        """Whether to stop before this step. Under DDP all ranks must stop at the same step
        (one left running would wait forever at the next gradient all-reduce), and a signal
        reaches them at slightly different steps: so one asking stops them all."""
        flag = self.control.cancelled
        if self.world > 1:
            t = torch.tensor([1.0 if flag else 0.0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def _save(self, name: str, model, opt, sched, state: dict[str, Any]) -> None:
        from engines.checkpoint import save_checkpoint

        if self.rank != 0:
            return
        save_checkpoint(self.out / name, model, train=state, optimizer=opt.state_dict(),
                        scheduler=sched.state_dict() if sched is not None else None)

    # -- the loop --------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        # First of all: a GPU asked for but missing is a ValueError before any work or file.
        device = self.device = resolve_device(cfg.device, local_rank())
        on_cuda = device.type == "cuda"
        if on_cuda:
            torch.cuda.set_device(device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        data = read_manifest(cfg.manifest, seed=cfg.seed)
        model, opt, sched, resume = self._build(data)
        ddp_model = None
        if self.world > 1:
            ddp_kw = {"device_ids": [device.index], "output_device": device.index} if on_cuda else {}
            ddp_model = torch.nn.parallel.DistributedDataParallel(_StepModule(model), find_unused_parameters=True,
                                                                  **ddp_kw)
        if self.rank == 0:
            (self.out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
        train_set, val_set = data.split("train"), data.split("val")
        accum = cfg.accumulation or int(getattr(model.config, "accumulation", 1) or 1)
        counts = np.array([sum(s.label == c for s in train_set) for c in data.classes], float)
        weights = (counts.sum() / (len(counts) * np.maximum(counts, 1))) if cfg.class_weights else np.ones(len(counts))
        self._log(f"{cfg.model}/{cfg.preset}: {len(train_set)} train, {len(val_set)} val slides; "
                  f"classes {data.classes}; accumulation {accum}; ranks {self.world}; device {device}")

        start_epoch, start_step = 0, 0
        history: list[dict[str, float]] = []
        best: float | None = None
        if resume is not None:
            tr = resume.get("train") or {}
            start_epoch, start_step = int(tr.get("epoch", 0)), int(tr.get("step", 0))
            history = list(tr.get("history", []))
            best = tr.get("best")
            if start_step and tr.get("torch_rng") is not None:
                torch.set_rng_state(tr["torch_rng"])
            if start_step and on_cuda and tr.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(tr["cuda_rng"], device)
            self._log(f"resuming at epoch {start_epoch + 1}, step {start_step}")

        my_train = _shard(train_set, self.rank, self.world)
        steps = len(my_train)
        t_start = time.monotonic()
        done_steps = 0
        total_steps = max(1, (cfg.epochs - start_epoch) * steps - start_step)
        for epoch in range(start_epoch, cfg.epochs):
            order, orients = _epoch_plan(my_train, cfg.seed, epoch, cfg.augment)
            first = start_step if epoch == start_epoch else 0
            if first == 0:
                torch.manual_seed(cfg.seed * 100003 + epoch * 1009 + self.rank)
            model.train()
            opt.zero_grad(set_to_none=True)
            run_loss, n_loss = 0.0, 0
            if first and resume is not None:
                run_loss = float((resume.get("train") or {}).get("run_loss", 0.0))
                n_loss = int((resume.get("train") or {}).get("n_loss", 0))
            for step in range(first, steps):
                self.control.wait_if_paused()
                if step % accum == 0 and self._cancel_agreed():
                    state = {"epoch": epoch, "step": step, "history": history, "best": best,
                             "seed": cfg.seed, "torch_rng": torch.get_rng_state(),
                             "run_loss": run_loss, "n_loss": n_loss}
                    if on_cuda:  # a CPU ByteTensor, like torch_rng
                        state["cuda_rng"] = torch.cuda.get_rng_state(device)
                    self._save("last.pt", model, opt, sched, state)
                    self._log(f"cancelled at epoch {epoch + 1}, step {step}; resumable from last.pt")
                    return TrainResult(self.out, epoch, best, history, cancelled=True)
                sample, orient = order[step], orients[step]
                label = data.label_index(sample)
                try:
                    with Slide(sample.path) as slide:
                        view = SlideView(slide, orientation=orient)
                        if ddp_model is not None:
                            loss_t, logits, parts_ = ddp_model(view, label, epoch)
                            out = StepOutput(loss_t, logits, parts_)
                        else:
                            out = model.training_step(view, label, epoch)
                        loss = out.loss * float(weights[label]) / accum
                        loss.backward()
                except SlideError as exc:
                    self._log(f"skipped {sample.path.name}: {exc}")
                    continue
                if (step + 1) % accum == 0 or step + 1 == steps:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                run_loss += float(out.loss.detach())
                n_loss += 1
                done_steps += 1
                elapsed = time.monotonic() - t_start
                eta = elapsed / done_steps * (total_steps - done_steps)
                parts = {"loss": float(out.loss.detach()), **out.parts}
                self._emit(StepEvent(epoch + 1, cfg.epochs, step + 1, steps, parts, eta))
            if sched is not None:
                sched.step()
            metrics = {"epoch": float(epoch + 1), "train_loss": run_loss / max(n_loss, 1),
                       "lr": float(opt.param_groups[0]["lr"])}
            metrics.update(self.evaluate(model, val_set, data))
            key = _selection_key(metrics)
            is_best = best is None or key > best
            if is_best:
                best = key
            history.append(metrics)
            state = {"epoch": epoch + 1, "step": 0, "history": history, "best": best, "seed": cfg.seed,
                     "metrics": metrics}
            self._save("last.pt", model, opt, sched, state)
            if is_best:
                self._save("best.pt", model, opt, sched, state)
            if self.rank == 0:
                with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(metrics) + "\n")
            self._emit(EpochEvent(epoch + 1, metrics, is_best))
            self._log("epoch {}: ".format(epoch + 1) + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"))
        return TrainResult(self.out, cfg.epochs, best, history)

    def evaluate(self, model, samples: list[Sample], data: Dataset) -> dict[str, float]:
        """Validation loss, accuracy and AUROC over ``samples`` (gathered across ranks)."""
        if not samples:
            return {}
        model.eval()
        mine = samples[self.rank :: self.world]
        rows = []
        with torch.no_grad():
            for s in mine:
                try:
                    with Slide(s.path) as slide:
                        probs = model.explain(SlideView(slide), lambda e: None)
                except SlideError as exc:
                    self._log(f"skipped {s.path.name} in validation: {exc}")
                    continue
                rows.append((list(map(float, probs)), data.label_index(s)))
        if self.world > 1:
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        model.train()
        if not rows:
            return {}
        probs = np.array([r[0] for r in rows])
        labels = [r[1] for r in rows]
        loss = float(np.mean([-math.log(max(p[l], 1e-7)) for p, l in zip(probs, labels)]))
        acc = float(np.mean(probs.argmax(1) == np.array(labels)))
        return {"val_loss": loss, "val_accuracy": acc, "val_auroc": macro_auroc(probs, labels)}


def train(cfg: TrainConfig, on_event: Callable[[object], None] | None = None,
          control: TrainControl | None = None) -> TrainResult:
    return Trainer(cfg, on_event, control).run()
