"""Training recipes: the optimiser settings and schedule each model preset trains with.

The ``paper`` presets carry their paper's training (or, where the paper is silent, the
authors' public reference code's); ``tiny`` and any other preset use MagLens's short default.
A value the user gives (``maglens train --lr``, the training dialog) overrides the recipe's.
The README's "Paper vs MagLens" table lists each figure with its source.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

SCHEDULERS = ("cosine", "plateau", "step", "exp_restart", "none")


@dataclass(frozen=True)
class Recipe:
    optimizer: str  # the optimiser the model's make_optimizer builds: "adam" or "adamw"
    lr: float  # for models with two parameter groups, the heads' rate (see the model config)
    weight_decay: float
    scheduler: str  # one of SCHEDULERS
    epochs: int
    accumulation: int | None  # slides per optimiser step (batch 1 per slide); None: the model config's
    clip: float | None = None  # gradient-norm clip, None for none
    # plateau: multiply by factor when the validation accuracy has not improved for patience epochs
    plateau_factor: float = 0.1
    plateau_patience: int = 25
    # step: multiply by gamma every step_epochs
    step_epochs: int = 30
    step_gamma: float = 0.1
    # exp_restart: multiply by gamma every epoch and restart at restart_lr every restart_epochs
    exp_gamma: float = 0.95
    restart_epochs: int = 50
    restart_lr: float = 1e-4
    source: str = ""  # where the figures come from, shown in the training dialog

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if not (self.lr > 0 and self.epochs >= 1 and (self.accumulation or 1) >= 1 and self.weight_decay >= 0):
            raise ValueError("a recipe needs lr > 0, epochs >= 1, accumulation >= 1, weight decay >= 0")
        if self.clip is not None and not self.clip > 0:
            raise ValueError("clip must be positive")

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for the training dialog and the log."""
        sched = {
            "cosine": "cosine annealing",
            "plateau": f"x{self.plateau_factor:g} after {self.plateau_patience} epochs without a better "
                       "validation accuracy",
            "step": f"x{self.step_gamma:g} every {self.step_epochs} epochs",
            "exp_restart": f"x{self.exp_gamma:g} per epoch, restarting at {self.restart_lr:g} every "
                           f"{self.restart_epochs} epochs",
            "none": "constant",
        }[self.scheduler]
        clip = f", clip {self.clip:g}" if self.clip else ""
        wd = f", weight decay {self.weight_decay:g}" if self.weight_decay else ""
        accum = f"{self.accumulation} slide(s) per step" if self.accumulation else "the model's accumulation"
        return f"{self.optimizer.capitalize()} {self.lr:g}{wd}, {sched}, {self.epochs} epochs, {accum}{clip}"


# MagLens's short schedule for small presets: minutes on a laptop CPU.
DEFAULT = Recipe("adam", 1e-3, 0.0, "cosine", 10, None, source="MagLens default for small presets")

PAPER: dict[str, Recipe] = {
    # Sec. 4.2: Adam, 200 epochs, batch 16 (3 layers), lr 3e-5, cosine annealing.
    "magnet": Recipe("adam", 3e-5, 0.0, "cosine", 200, 16,
                     source="MagNet paper, Sec. 4.2"),
    # Sec. 4: Adam 1e-4, x0.1 when validation accuracy has not improved for 25 epochs, 100 epochs.
    "spatial_mag": Recipe("adam", 1e-4, 0.0, "plateau", 100, 1, plateau_factor=0.1, plateau_patience=25,
                          source="Spatial-magnification paper, Sec. 4"),
    # The paper gives no schedule; the authors' training script: Adam 1e-4, weight decay 1e-4,
    # StepLR (30 epochs, x0.8), 100 epochs, gradient-norm clip 5.
    "zoom_in": Recipe("adam", 1e-4, 1e-4, "step", 100, 1, clip=5.0, step_epochs=30, step_gamma=0.8,
                      source="Zoom-In reference training script"),
    # Sec. 4: Adam 1e-3, x0.95 after each epoch, reset to 1e-4 every 50 epochs, 200 epochs, batch 2.
    "grid_attention": Recipe("adam", 1e-3, 0.0, "exp_restart", 200, 2, exp_gamma=0.95, restart_epochs=50,
                             restart_lr=1e-4, source="Grid-attention paper, Sec. 4"),
    # Sec. 3: AdamW, weight decay 1e-6, 2e-5 for the new heads and 1e-5 for the backbone,
    # x0.1 on a plateau, batch 1 with 8 slides of accumulation. The paper gives neither the
    # epochs nor the patience: 80 epochs is the reference code's default, patience 10 is ours.
    "local_learning": Recipe("adamw", 2e-5, 1e-6, "plateau", 80, 8, plateau_factor=0.1, plateau_patience=10,
                             source="Local-learning paper, Sec. 3; epochs from its reference code"),
}


def recipe_for(model: str, preset: str | None) -> Recipe:
    """The recipe a model preset trains with when the user sets nothing."""
    if preset == "paper" and model in PAPER:
        return PAPER[model]
    return DEFAULT


def lr_factor(recipe: Recipe, epoch: int) -> float:
    """The multiplier of ``recipe.lr`` during ``epoch`` (0-based) for the epoch-wise schedules
    that have a closed form (``exp_restart``); the trainer uses it through ``LambdaLR``."""
    if recipe.scheduler != "exp_restart":
        raise ValueError(f"{recipe.scheduler} has no closed form here")
    cycle, within = divmod(epoch, recipe.restart_epochs)
    start = 1.0 if cycle == 0 else recipe.restart_lr / recipe.lr
    return start * recipe.exp_gamma ** within
