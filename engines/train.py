"""Training and fine-tuning of any MagLens model from a manifest; the same code runs behind
the app's training dialog, ``maglens train`` and ``torchrun -m app train`` (DDP).

Each model owns its losses (``SlideModel.training_step``); this module owns the loop: one slide
per step with gradient accumulation, flips/quarter turns as augmentation, class weights,
validation each epoch (loss, accuracy, AUROC), the preset's learning-rate schedule
(``engines.recipes``: the paper's for ``paper`` presets), gradient clipping, atomic ``last``/``best``
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

Crash safety: the run's settings that shape its numbers (seed, accumulation, threads, device
kind, processes, frozen backbone, preset) and hashes of the manifest and of the split are
stored in every checkpoint (``train["run"]``). A resume takes them where the caller leaves a
setting open (None; "auto" for the device) and refuses a conflicting one with a ``ValueError``.
A split drawn by seed (rows without a split) is recorded in ``split.csv`` and reused on resume.
At the end of an epoch ``best.pt`` is written before ``last.pt`` records the epoch, then
``metrics.jsonl`` is rewritten from the history in ``last.pt`` (also at every resume), all
atomically; a resume also removes temporary files a killed write left. So a process killed at
any moment and resumed ends with the files of an uninterrupted run. Callers hold
``engines.runlock.RunLock(out)`` around a run so that two never share a folder.

Under torchrun the ranks meet at fixed points only (the cancel flag, buffers from rank 0 and
a read-failure flag before each step, and the averaged gradients at each optimiser step), so
a slide that fails to read on one rank makes every rank skip that step together instead of
leaving the others waiting. In one process a skipped slide still closes its accumulation
group at the group's last step.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from engines import registry
from engines.checkpoint import checkpoint_sha256
from engines.data import Dataset, Sample, read_manifest
from engines.recipes import SCHEDULERS
from engines.devices import dist_backend, local_rank, resolve_device
from engines.hostmem import return_large_frees_to_os
from engines.sampling import Orientation, SlideView
from engines.slide import Slide, SlideError
from engines.trace import write_atomic

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    manifest: str
    model: str
    preset: str | None = "tiny"  # None: the run's own on resume, else tiny
    out: str = "runs/train"
    # None: the run's on resume, else the preset's recipe (engines.recipes); a value given wins.
    epochs: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    clip: float | None = None  # gradient-norm clip; 0 turns a recipe's clip off
    accumulation: int | None = None  # None: the run's on resume, else the model config's, else 1
    seed: int | None = None  # None: the run's on resume, else 0
    augment: bool = True
    class_weights: bool = True
    scheduler: str | None = None  # one of engines.recipes.SCHEDULERS; None: the recipe's
    resume: bool = False
    init: str | None = None  # checkpoint to fine-tune from
    freeze_backbone: bool | None = None  # None: the run's on resume, else False
    threads: int | None = None  # None: the run's on resume, else torch's default
    device: str | None = "auto"  # "auto"/None (the run's kind on resume), "cpu", "cuda", "cuda:N"
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
    epochs: int | None = None  # the run's planned epochs


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
    best_epoch: int | None = None  # the epoch best.pt holds (1-based)


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


def _broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Every rank takes rank 0's values of ``tensors`` (one broadcast per dtype and device)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            groups.setdefault((t.dtype, t.device), []).append(t)
    for ts in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        dist.broadcast(flat, 0)
        offset = 0
        with torch.no_grad():
            for t in ts:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def _average_gradients(model: torch.nn.Module, world: int) -> None:
    """Each trainable parameter's gradient becomes its mean over the ranks, as DDP would make
    it: one all-reduce per optimiser step. A parameter no rank has a gradient for keeps None
    (the optimiser then leaves it alone, as it would in one process)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    dev = params[0].device
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float().to(dev)
                      for p in params]
                     + [torch.tensor([float(p.grad is not None) for p in params], device=dev)])
    dist.all_reduce(flat)
    total = flat.numel() - len(params)
    had = flat[total:].tolist()
    flat = flat[:total] / world
    offset = 0
    for p, h in zip(params, had):
        n = p.numel()
        if h > 0:
            g = flat[offset:offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        offset += n


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


def best_epoch(history: list[dict[str, float]]) -> int | None:
    """The epoch (1-based) whose checkpoint is ``best.pt``: the trainer's own rule, the first
    epoch whose ``_selection_key`` beats every earlier one."""
    best_key: float | None = None
    epoch: int | None = None
    for m in history:
        key = _selection_key(m)
        if best_key is None or key > best_key:
            best_key, epoch = key, int(m.get("epoch", 0))
    return epoch


# ---------------------------------------------------------------------------------------
# The run's identity: what a resume must reuse
# ---------------------------------------------------------------------------------------
SPLIT_FILE = "split.csv"
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.json", SPLIT_FILE)
KILL_ENV = "MAGLENS_TEST_KILL_AT"


def _fault_point(name: str) -> None:
    """Fault injection for the crash tests: with ``MAGLENS_TEST_KILL_AT=<name>`` the process
    kills itself with SIGKILL at that point (names: ``step@E.S`` before step S of epoch E,
    ``after-best@E`` between best.pt and last.pt, ``after-last@E`` between last.pt and
    metrics.jsonl). ``<name>=INT`` sends SIGINT instead, as Ctrl+C would."""
    want = os.environ.get(KILL_ENV)
    if not want:
        return
    point, _, sig = want.partition("=")
    if point == name:
        os.kill(os.getpid(), signal.SIGINT if sig == "INT" else getattr(signal, "SIGKILL", signal.SIGTERM))


def file_sha256(path: str | os.PathLike) -> str:
    return checkpoint_sha256(path)  # one streaming sha256 of a file, for manifests too


def split_sha256(samples: list[Sample]) -> str:
    """Hash of which manifest row is in which split, with its label."""
    rows = [[s.row, s.label, s.split] for s in samples]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _manifest_gives_splits(path: str | os.PathLike) -> bool:
    """Whether every row of the manifest names its split (else the split is drawn by seed)."""
    text = Path(path).read_text(encoding="utf-8-sig")
    reader = csv.DictReader(text.splitlines())
    rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    return bool(rows) and all(r.get("slide") == "" or r.get("split") for r in rows)


def _split_csv(samples: list[Sample]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "slide", "label", "split"])
    for s in samples:
        w.writerow([s.row, s.path.name, s.label, s.split])
    return buf.getvalue()


def _apply_recorded_split(data: Dataset, path: Path) -> Dataset:
    """The dataset with the split recorded in ``path`` (the run's split.csv)."""
    try:
        recorded = {int(r["row"]): r for r in csv.DictReader(path.read_text(encoding="utf-8").splitlines())}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); it records the run's split") from None
    samples = []
    for s in data.samples:
        r = recorded.get(s.row)
        if r is None or r.get("slide") != s.path.name or r.get("label") != s.label:
            raise ValueError(f"{path} does not match the manifest at row {s.row} ({s.path.name}); "
                             "resume needs the manifest the run started with")
        samples.append(replace(s, split=r.get("split", s.split)))
    return Dataset(samples, data.classes)


def _interned_keys(obj: Any) -> Any:
    """``obj`` with every dict key string interned, as the keys the code itself makes are.
    Pickle shares a string it meets twice by identity, so only then does a resumed run's
    checkpoint come out byte for byte as an uninterrupted run's."""
    if isinstance(obj, dict):
        return {(sys.intern(k) if isinstance(k, str) else k): _interned_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_interned_keys(v) for v in obj]
    return obj


def fill_recipe(cfg: TrainConfig, model) -> TrainConfig:
    """``cfg`` with every schedule setting it leaves open (None) taken from the recipe of the
    model's preset (``engines.recipes``). A recipe's accumulation applies only when neither
    the user nor the run set one; without either, the model config's applies as before."""
    from engines.recipes import recipe_for

    preset = str(getattr(model, "preset", None) or cfg.preset)  # a checkpoint's own preset
    recipe = recipe_for(cfg.model, preset)
    changes: dict[str, Any] = {"preset": preset}
    for name in ("lr", "weight_decay", "scheduler", "epochs", "clip"):
        if getattr(cfg, name) is None:
            changes[name] = getattr(recipe, name)
    if cfg.accumulation is None and recipe.accumulation:
        changes["accumulation"] = recipe.accumulation
    cfg = replace(cfg, **changes)
    if cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {cfg.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    return replace(cfg, clip=cfg.clip or None)


def make_scheduler(opt, cfg: TrainConfig):
    """The learning-rate schedule ``cfg.scheduler`` names, stepped once per epoch."""
    from engines.recipes import Recipe, lr_factor, recipe_for

    recipe = recipe_for(cfg.model, cfg.preset)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs))
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=recipe.plateau_factor,
                                                          patience=recipe.plateau_patience)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=recipe.step_epochs, gamma=recipe.step_gamma)
    if cfg.scheduler == "exp_restart":
        # The restart rate is absolute (1e-4 in the paper), so the factor is taken for this lr.
        shape = Recipe("adam", cfg.lr, 0.0, "exp_restart", 1, None, exp_gamma=recipe.exp_gamma,
                       restart_epochs=recipe.restart_epochs, restart_lr=recipe.restart_lr)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(shape, e))
    return None


def step_scheduler(sched, metrics: dict[str, float]) -> None:
    """End of an epoch. A plateau schedule watches the validation accuracy (the training loss,
    negated, when there is no validation split)."""
    if sched is None:
        return
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        watched = metrics.get("val_accuracy")
        sched.step(watched if watched is not None else -metrics.get("train_loss", 0.0))
    else:
        sched.step()


def read_run_state(out: str | os.PathLike) -> dict[str, Any]:
    """The ``train`` dict of ``out/last.pt`` (``CheckpointError`` for a damaged file)."""
    from engines.checkpoint import load_checkpoint

    return dict(load_checkpoint(Path(out) / "last.pt").get("train") or {})


def resume_config(cfg: TrainConfig, train_state: dict[str, Any] | None = None) -> TrainConfig:
    """``cfg`` with the stored settings of the run in ``cfg.out`` filled in where ``cfg``
    leaves them open; ``ValueError`` naming every setting that conflicts with the run."""
    tr = read_run_state(cfg.out) if train_state is None else train_state
    run = dict(tr.get("run") or {})
    if "seed" not in run and tr.get("seed") is not None:  # checkpoints from before run state
        run["seed"] = tr["seed"]
    conflicts: list[str] = []
    changes: dict[str, Any] = {}
    for name in ("seed", "accumulation", "threads", "freeze_backbone", "preset", "lr", "weight_decay",
                 "scheduler", "clip"):
        if name not in run:
            continue
        mine = getattr(cfg, name)
        if mine is None:
            changes[name] = run[name]
        elif mine != run[name]:
            conflicts.append(f"{name} {mine} differs from the run's {run[name]}")
    if cfg.epochs is None and run.get("epochs") is not None:  # more epochs than the run's is fine
        changes["epochs"] = run["epochs"]
    stored_dev = run.get("device")
    if stored_dev is not None:
        if cfg.device in (None, "auto"):
            changes["device"] = stored_dev
        elif str(cfg.device).split(":")[0] != stored_dev:
            conflicts.append(f"device {cfg.device} differs from the run's {stored_dev}")
    if conflicts:
        raise ValueError(f"cannot resume the run in {cfg.out}: " + "; ".join(conflicts)
                         + " (leave a setting out to use the run's)")
    return replace(cfg, **changes)


class Trainer:
    def __init__(self, cfg: TrainConfig, on_event: Callable[[object], None] | None = None,
                 control: TrainControl | None = None) -> None:
        self.cfg = cfg
        self.on_event = on_event or (lambda e: None)
        self.control = control or TrainControl()
        self.out = Path(cfg.out)
        self.rank, self.world = _dist_info()
        self.device: torch.device | None = None  # resolved at the start of run()
        self.run_state: dict[str, Any] = {}

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

    def _build(self, data: Dataset, resume_ckpt: dict[str, Any] | None):
        from engines.checkpoint import model_from_checkpoint

        if resume_ckpt is not None:
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
        self.cfg = fill_recipe(self.cfg, model)
        opt = model.make_optimizer(self.cfg.lr, self.cfg.weight_decay)
        sched = make_scheduler(opt, self.cfg)
        if resume_ckpt is not None:
            if resume_ckpt.get("optimizer"):
                opt.load_state_dict(resume_ckpt["optimizer"])
            if sched is not None and resume_ckpt.get("scheduler"):
                sched.load_state_dict(resume_ckpt["scheduler"])
        return model, opt, sched

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

    def _step_agreed(self, failure: SlideError | None, sample: Sample) -> bool:
        """Whether every rank read its slide of this step; if one could not, all skip it
        (a rank that went on alone would be one step ahead at every later meeting)."""
        if self.world == 1:
            if failure is not None:
                self._log(f"skipped {sample.path.name}: {failure}")
            return failure is None
        t = torch.tensor([0.0 if failure is None else 1.0])
        dist.all_reduce(t)
        if t.item() == 0:
            return True
        notes: list = [None] * self.world
        dist.all_gather_object(notes, None if failure is None else str(failure))
        self._log("skipped a step on every rank: " + "; ".join(
            f"rank {r}: {n}" for r, n in enumerate(notes) if n is not None))
        return False

    def _save(self, name: str, model, opt, sched, state: dict[str, Any]) -> None:
        from engines.checkpoint import save_checkpoint

        if self.rank != 0:
            return
        save_checkpoint(self.out / name, model, train={**state, "run": self.run_state},
                        optimizer=opt.state_dict(), scheduler=sched.state_dict() if sched is not None else None)

    def _write_metrics(self, history: list[dict[str, float]]) -> None:
        """metrics.jsonl as the history in last.pt says, written whole (never appended, so a
        killed write cannot leave a torn or duplicated line)."""
        if self.rank != 0:
            return
        path = self.out / "metrics.jsonl"
        if history:
            write_atomic(path, "".join(json.dumps(m) + "\n" for m in history))
        elif path.exists():
            path.unlink()

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of atomic writes that a killed process left (the caller holds the
        run lock, so none of them belongs to a live writer)."""
        for p in self.out.glob(".*.tmp"):
            if any(p.name.startswith(f".{name}.") for name in RUN_FILES):
                try:
                    p.unlink()
                except OSError:
                    pass

    def _prepare_data(self, resume: dict[str, Any] | None) -> Dataset:
        """The manifest, with the run's recorded split on resume; checks a resumed run's
        manifest and split against the hashes it stored."""
        cfg = self.cfg
        data = read_manifest(cfg.manifest, seed=cfg.seed)
        recorded = self.out / SPLIT_FILE
        if resume is not None and recorded.is_file():
            data = _apply_recorded_split(data, recorded)
        manifest_hash, split_hash = file_sha256(cfg.manifest), split_sha256(data.samples)
        run = dict(((resume or {}).get("train") or {}).get("run") or {})
        if run.get("manifest_sha256") not in (None, manifest_hash):
            raise ValueError(f"manifest {cfg.manifest} changed since the run in {self.out} started; "
                             "resume needs the same manifest (or start a new run with --init)")
        if run.get("split_sha256") not in (None, split_hash):
            raise ValueError(f"the split of {cfg.manifest} differs from the one the run in {self.out} "
                             f"trained with (is {recorded.name} missing?); resume needs the same split")
        self.run_state.update(manifest_sha256=manifest_hash, split_sha256=split_hash)
        return data

    # -- the loop --------------------------------------------------------------------
    def run(self) -> TrainResult:
        # Nothing here writes a file until the manifest, the checkpoints and the settings
        # have all been checked: bad input leaves the run folder as it was.
        resume: dict[str, Any] | None = None
        if self.cfg.resume:
            from engines.checkpoint import load_checkpoint

            last = self.out / "last.pt"
            if not last.exists():
                raise FileNotFoundError(f"nothing to resume: {last} does not exist")
            resume = _interned_keys(load_checkpoint(last))
            self.cfg = resume_config(self.cfg, dict(resume.get("train") or {}))
        cfg = self.cfg = replace(self.cfg, seed=0 if self.cfg.seed is None else self.cfg.seed,
                                 preset=self.cfg.preset or "tiny",
                                 freeze_backbone=bool(self.cfg.freeze_backbone))
        # A GPU asked for but missing is a ValueError before any work or file.
        device = self.device = resolve_device(cfg.device, local_rank())
        on_cuda = device.type == "cuda"
        if on_cuda:
            torch.cuda.set_device(device)
        else:
            return_large_frees_to_os()  # resident memory follows the live tensors (hostmem)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        data = self._prepare_data(resume)
        model, opt, sched = self._build(data, resume)
        cfg = self.cfg  # with the recipe's values filled in
        if resume is not None:  # the checkpoint's preset, also for files from before run state
            cfg = self.cfg = replace(cfg, preset=str(getattr(model, "preset", cfg.preset)))
        stored = dict((resume or {}).get("train") or {}).get("run") or {}
        if stored.get("world", self.world) != self.world:
            raise ValueError(f"the run in {self.out} trained with {stored['world']} process(es); "
                             f"resume it with as many (now {self.world})")
        accum = cfg.accumulation or int(getattr(model.config, "accumulation", 1) or 1)
        self.run_state.update(seed=cfg.seed, accumulation=accum, threads=torch.get_num_threads(),
                              lr=cfg.lr, weight_decay=cfg.weight_decay, scheduler=cfg.scheduler,
                              clip=cfg.clip, epochs=cfg.epochs,
                              device=device.type, world=self.world, freeze_backbone=cfg.freeze_backbone,
                              preset=str(getattr(model, "preset", cfg.preset)))
        if self.world > 1:  # every rank starts from rank 0's weights, as DDP would
            _broadcast_from_rank0(list(model.parameters()) + list(model.buffers()))

        train_set, val_set = data.split("train"), data.split("val")
        start_epoch, start_step = 0, 0
        history: list[dict[str, float]] = []
        best: float | None = None
        tr: dict[str, Any] = dict((resume or {}).get("train") or {})
        if resume is not None:
            start_epoch, start_step = int(tr.get("epoch", 0)), int(tr.get("step", 0))
            history = list(tr.get("history", []))
            best = tr.get("best")

        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temporaries()
            if resume is None and not _manifest_gives_splits(cfg.manifest):
                write_atomic(self.out / SPLIT_FILE, _split_csv(data.samples))
            write_atomic(self.out / "config.json", json.dumps(asdict(cfg), indent=1, default=str))
            if resume is not None:
                self._write_metrics(history)
        if resume is None:
            # A resumable last.pt from the start: a run killed in its first epoch resumes too.
            self._save("last.pt", model, opt, sched, {"epoch": 0, "step": 0, "history": [], "best": None,
                                                      "seed": cfg.seed})
        counts = np.array([sum(s.label == c for s in train_set) for c in data.classes], float)
        weights = (counts.sum() / (len(counts) * np.maximum(counts, 1))) if cfg.class_weights else np.ones(len(counts))
        self._log(f"{cfg.model}/{cfg.preset}: {len(train_set)} train, {len(val_set)} val slides; "
                  f"classes {data.classes}; accumulation {accum}; ranks {self.world}; device {device}")
        if resume is not None:
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
                run_loss = float(tr.get("run_loss", 0.0))
                n_loss = int(tr.get("n_loss", 0))
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
                    return TrainResult(self.out, epoch, best, history, cancelled=True,
                                       best_epoch=best_epoch(history))
                _fault_point(f"step@{epoch + 1}.{step + 1}")
                sample, orient = order[step], orients[step]
                label = data.label_index(sample)
                if self.world > 1:  # BatchNorm statistics follow rank 0, as under DDP
                    _broadcast_from_rank0(list(model.buffers()))
                out, ok = None, False
                try:
                    with Slide(sample.path) as slide:
                        failure: SlideError | None = None
                        try:
                            out = model.training_step(SlideView(slide, orientation=orient), label, epoch)
                        except SlideError as exc:
                            failure = exc
                        ok = self._step_agreed(failure, sample)
                        if ok:  # inside the `with`: some models read tiles again in backward
                            (out.loss * float(weights[label]) / accum).backward()
                except SlideError as exc:
                    if out is None:  # the slide did not open: every rank still has to agree
                        ok = self._step_agreed(exc, sample)
                    else:  # failed in backward (no collective there): this rank's own loss
                        self._log(f"skipped {sample.path.name}: {exc}")
                        ok = False
                # The group's last step closes it even when its slide was skipped, so a failed
                # read never merges two accumulation groups into one optimiser step.
                if (step + 1) % accum == 0 or step + 1 == steps:
                    if self.world > 1:
                        _average_gradients(model, self.world)
                    if cfg.clip:  # after averaging, so every rank clips the same gradient
                        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                                       cfg.clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if not ok:
                    continue
                run_loss += float(out.loss.detach())
                n_loss += 1
                done_steps += 1
                elapsed = time.monotonic() - t_start
                eta = elapsed / done_steps * (total_steps - done_steps)
                parts = {"loss": float(out.loss.detach()), **out.parts}
                self._emit(StepEvent(epoch + 1, cfg.epochs, step + 1, steps, parts, eta))
            metrics = {"epoch": float(epoch + 1), "train_loss": run_loss / max(n_loss, 1)}
            metrics.update(self.evaluate(model, val_set, data))
            step_scheduler(sched, metrics)
            metrics["lr"] = float(opt.param_groups[0]["lr"])  # the rate the next epoch uses
            key = _selection_key(metrics)
            is_best = best is None or key > best
            if is_best:
                best = key
            history.append(metrics)
            state = {"epoch": epoch + 1, "step": 0, "history": history, "best": best, "seed": cfg.seed,
                     "metrics": metrics}
            # best.pt first: a crash between the two leaves last.pt one epoch behind, and the
            # resumed run redoes that epoch and writes the same best.pt again.
            if is_best:
                self._save("best.pt", model, opt, sched, state)
            _fault_point(f"after-best@{epoch + 1}")
            self._save("last.pt", model, opt, sched, state)
            _fault_point(f"after-last@{epoch + 1}")
            self._write_metrics(history)
            self._emit(EpochEvent(epoch + 1, metrics, is_best, cfg.epochs))
            self._log("epoch {}: ".format(epoch + 1) + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"))
        return TrainResult(self.out, cfg.epochs, best, history, best_epoch=best_epoch(history))

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
