"""Training checkpoints: LoRA, optimiser, scheduler, EMA and step, written atomically, read without pickle.

`checkpoint-N/` holds
- `lora.safetensors` (and `ema.safetensors` with use_ema): the weights;
- `optimizer.safetensors`: every tensor of the optimiser and scheduler state;
- `training_state.json`: everything else (step, scheduler, loss history, data version, MLflow run
  id), naming its tensors by their key in `optimizer.safetensors`.
Only JSON and safetensors are read back, so a checkpoint that came from shared storage or a
download cannot run code. Checkpoints of older versions (`training_state.pt`, a pickle) are
refused with the reason and never unpickled.

A checkpoint appears under its final name only once complete (written in a hidden temp folder,
then renamed); one replaced or pruned is first renamed to a hidden name, then deleted. So a kill
at any moment leaves complete checkpoints and hidden leftovers, which `remove_stale_temp` clears.
"""

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.errors import QwenEditError
from trainer.faults import kill_point

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "training_state.json"
LEGACY_STATE_NAME = "training_state.pt"  # a pickle: refused
FORMAT = "qwen-edit-checkpoint/2"
STALE_PREFIXES = (".checkpoint-", ".pruning-", ".replaced-")  # hidden folders of saves that were cut short
_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


class CheckpointError(QwenEditError):
    pass


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
    mlflow_run_id: str | None = None  # a resumed run continues this MLflow run
    skipped_steps: list = field(default_factory=list)  # non-finite steps skipped (max_nonfinite_steps)


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(root: Path, state: TrainingState, total_limit: int | None) -> Path:
    from trainer.training.guards import assert_finite

    assert_finite(state.lora, f"the LoRA at step {state.step}")  # a NaN checkpoint must never rotate out a good one
    if state.ema is not None:
        assert_finite(state.ema, f"the EMA weights at step {state.step}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".checkpoint-{state.step}-"))
    try:
        save_file(state.lora, str(tmp / "lora.safetensors"))
        kill_point("checkpoint.lora_written", state.step)
        if state.ema is not None:
            save_file(state.ema, str(tmp / "ema.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        meta = {
            "format": FORMAT,
            "step": state.step,
            "optimizer": _encode(state.optimizer, tensors, "optimizer"),
            "lr_scheduler": _encode(state.lr_scheduler, tensors, "lr_scheduler"),
            "loss_history": [float(v) for v in state.loss_history],
            "ema_step": state.ema_step,
            "data_version": state.data_version,
            "mlflow_run_id": state.mlflow_run_id,
            "skipped_steps": _encode(state.skipped_steps, tensors, "skipped_steps"),
        }
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / STATE_NAME).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _fsync_folder(tmp)
        kill_point("checkpoint.state_written", state.step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = _publish(tmp, root / f"checkpoint-{state.step}")
    kill_point("checkpoint.published", state.step)
    if total_limit is not None:
        for old in checkpoint_dirs(root)[:-total_limit]:
            _remove(old, ".pruning-", state.step)
    return final


def load_checkpoint(path: Path) -> TrainingState:
    path = Path(path)
    state_file = path / STATE_NAME
    if not state_file.is_file():
        if (path / LEGACY_STATE_NAME).exists():
            raise CheckpointError(
                f"{path}: this checkpoint keeps its state in {LEGACY_STATE_NAME}, a pickle (an older qwen-edit's "
                "format), and pickles can run code when loaded, so it is not read. Move or delete that folder "
                "(training then starts from the newest checkpoint left, or from scratch), or resume from a checkpoint "
                "written by this version"
            )
        raise CheckpointError(f"{path}: not a complete checkpoint (no {STATE_NAME}); delete it to resume from the one before")
    try:
        meta = json.loads(state_file.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{STATE_NAME} is not a {FORMAT} file")
        tensors = load_file(str(path / "optimizer.safetensors"))
        ema_file = path / "ema.safetensors"
        return TrainingState(
            step=int(meta["step"]),
            lora=load_file(str(path / "lora.safetensors")),
            optimizer=_decode(meta["optimizer"], tensors),
            lr_scheduler=_decode(meta["lr_scheduler"], tensors),
            loss_history=[float(v) for v in meta["loss_history"]],
            ema=load_file(str(ema_file)) if ema_file.exists() else None,
            ema_step=int(meta.get("ema_step", 0)),
            data_version=str(meta.get("data_version", "")),
            mlflow_run_id=meta.get("mlflow_run_id"),
            skipped_steps=_decode(meta.get("skipped_steps", []), tensors),
        )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); delete it to resume from the one before") from None


def resolve_resume(root: Path, resume_from: str | None) -> Path | None:
    """`latest` -> newest checkpoint (or None on a fresh run); a path -> that checkpoint."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = checkpoint_dirs(root)
        return found[-1] if found else None
    path = Path(resume_from)
    if not _is_checkpoint(path) and _is_checkpoint(root / resume_from):
        path = root / resume_from  # a bare name such as 'checkpoint-500'
    if not _is_checkpoint(path):
        from trainer.errors import ConfigError

        raise ConfigError(
            f"resume_from_checkpoint={resume_from!r}: no checkpoint there (expected {path}/{STATE_NAME}); "
            f"use 'latest' or one of {[p.name for p in checkpoint_dirs(root)] or 'none yet'}"
        )
    return path


def remove_stale_temp(root: Path) -> list[Path]:
    """Delete the hidden folders that saves cut short by a kill left under `root`; returns them.

    Only while no other trainer writes here (trainer.training.run_lock holds the output_dir lock).
    """
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(STALE_PREFIXES)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


def move_aside(root: Path, to: Path) -> Path | None:
    """Move every checkpoint under `root` to `to` (replacing what was there): they belong to another run."""
    if not checkpoint_dirs(root):
        return None
    if to.exists():
        _remove(to, ".replaced-")
    to.parent.mkdir(parents=True, exist_ok=True)
    os.replace(root, to)
    return to


def _is_checkpoint(path: Path) -> bool:
    return (path / STATE_NAME).is_file() or (path / LEGACY_STATE_NAME).is_file()


def _publish(tmp: Path, final: Path) -> Path:
    """Rename `tmp` to `final`; a checkpoint already there is renamed away first, never half deleted in place."""
    aside = None
    if final.exists():
        aside = final.parent / f".replaced-{final.name}-{os.getpid()}"
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def _remove(path: Path, prefix: str, step: object = "") -> None:
    aside = path.parent / f"{prefix}{path.name}-{os.getpid()}"
    os.replace(path, aside)  # from here on it is no checkpoint: a kill leaves a hidden folder
    kill_point("checkpoint.pruning", step)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    """A checkpoint survives a power cut too, not only a killed process."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the optimiser / scheduler state as JSON + named tensors --------------------------------------
def _encode(value, tensors: dict[str, torch.Tensor], path: str):
    """Plain JSON values stay; tensors go to `tensors` under a unique name; tuples and non-string keys are tagged."""
    if torch.is_tensor(value):
        name = path if path not in tensors else f"{path}~{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {_TENSOR: name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not value.keys() & {_TENSOR, _TUPLE, _DICT}:
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
        return {_DICT: [[_encode(k, tensors, f"{path}.key"), _encode(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    raise CheckpointError(f"cannot store a {type(value).__name__} ({path}) in a checkpoint: only tensors and JSON values")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if value.keys() == {_TENSOR}:
            return tensors[value[_TENSOR]]
        if value.keys() == {_TUPLE}:
            return tuple(_decode(v, tensors) for v in value[_TUPLE])
        if value.keys() == {_DICT}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_DICT]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value
