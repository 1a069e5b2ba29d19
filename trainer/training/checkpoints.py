"""Training checkpoints: the LoRA, optimiser and scheduler state and the step, written atomically.

A checkpoint folder appears under its final name only once complete (written under a temp
name, then renamed), so `resume_from_checkpoint: latest` never picks up half a checkpoint.
"""

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainingState:
    step: int
    lora: dict[str, torch.Tensor]
    optimizer: dict
    lr_scheduler: dict
    loss_history: list[float]
    ema: dict[str, torch.Tensor] | None = None
    ema_step: int = 0
    data_version: str = ""  # the manifest it was trained on


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(root: Path, state: TrainingState, total_limit: int | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{state.step}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".checkpoint-{state.step}-"))
    save_file(state.lora, str(tmp / "lora.safetensors"))
    if state.ema is not None:
        save_file(state.ema, str(tmp / "ema.safetensors"))
    torch.save(
        {
            "step": state.step,
            "optimizer": state.optimizer,
            "lr_scheduler": state.lr_scheduler,
            "loss_history": state.loss_history,
            "ema_step": state.ema_step,
            "data_version": state.data_version,
        },
        tmp / "training_state.pt",
    )
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if total_limit is not None:
        for old in checkpoint_dirs(root)[:-total_limit]:
            shutil.rmtree(old)
    return final


def load_checkpoint(path: Path) -> TrainingState:
    meta = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    ema_file = path / "ema.safetensors"
    return TrainingState(
        step=meta["step"],
        lora=load_file(str(path / "lora.safetensors")),
        optimizer=meta["optimizer"],
        lr_scheduler=meta["lr_scheduler"],
        loss_history=meta["loss_history"],
        ema=load_file(str(ema_file)) if ema_file.exists() else None,
        ema_step=meta.get("ema_step", 0),
        data_version=meta.get("data_version", ""),
    )


def resolve_resume(root: Path, resume_from: str | None) -> Path | None:
    """`latest` -> newest checkpoint (or None on a fresh run); a path -> that checkpoint."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = checkpoint_dirs(root)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / "training_state.pt").is_file() and (root / resume_from / "training_state.pt").is_file():
        path = root / resume_from  # a bare name such as 'checkpoint-500'
    if not (path / "training_state.pt").is_file():
        from trainer.errors import ConfigError

        raise ConfigError(
            f"resume_from_checkpoint={resume_from!r}: no checkpoint there (expected {path}/training_state.pt); "
            f"use 'latest' or one of {[p.name for p in checkpoint_dirs(root)] or 'none yet'}"
        )
    return path
