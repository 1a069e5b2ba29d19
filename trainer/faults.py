"""Named kill points, for the tests that SIGKILL the trainer at exact moments (failpoints).

`QWEN_EDIT_KILL_AT=checkpoint.state_written:4` makes the process kill itself with SIGKILL the
first time it reaches `kill_point("checkpoint.state_written", 4)`: nothing is flushed, no
`finally` runs, exactly as under `kill -9`. Unset (always, outside tests) it costs one lookup of
the environment. The points are listed in KILL_POINTS so the tests can prove they try every one.
"""

import os
import signal

ENV = "QWEN_EDIT_KILL_AT"

KILL_POINTS = (
    "train.mid_step",  # after backward, before the optimizer step (detail: the step, 1-based)
    "checkpoint.lora_written",  # the checkpoint's lora.safetensors is in its temp folder (detail: step)
    "checkpoint.state_written",  # every file in the temp folder, not yet renamed (detail: step)
    "checkpoint.published",  # renamed to checkpoint-N, older ones not yet pruned (detail: step)
    "checkpoint.pruning",  # an old checkpoint half deleted (detail: the step being saved)
    "lora.diffusers_written",  # the LoRA file written in lora/.saving-*, not yet renamed
    "lora.before_comfyui",  # the diffusers file in place, the ComfyUI copy not yet written
    "train.final_checkpoint_saved",  # everything saved except training_summary.json
    "io.before_rename",  # an atomic write's temp file complete, not yet renamed (detail: file name)
)


def kill_point(name: str, detail: object = "") -> None:
    target = os.environ.get(ENV)
    if target and (target == name or target == f"{name}:{detail}"):
        os.kill(os.getpid(), signal.SIGKILL)
