"""Lets accelerate take its FSDP path in CPU processes; on PYTHONPATH for test_accelerate_fsdp.py only.

accelerate 1.15 turns an FSDP config into DistributedType.FSDP only on accelerator devices: in
CPU processes it picks MULTI_CPU (unsharded data parallel), which the trainer refuses. torch's
FSDP2 (`fully_shard`) itself runs on a CPU device mesh over gloo. So in each process launched
for FSDP, AcceleratorState is shown MULTI_GPU for the one decision that leaves the CPU out; the
process group (gloo), the device (CPU) and everything after are accelerate's and torch's own:
the FSDP plugin read from the config file, `fully_shard` per block, DTensor parameters.
Python imports this module at start-up in every process with its folder on PYTHONPATH.
"""

import os

if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and "LOCAL_RANK" in os.environ:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    _accelerator_state_init = AcceleratorState.__init__

    def _fsdp_on_cpu(self, *args, **kwargs):
        if kwargs.get("_from_accelerator") and not AcceleratorState._shared_state:
            if PartialState(cpu=True).distributed_type == DistributedType.MULTI_CPU:
                PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # AcceleratorState makes it FSDP
        _accelerator_state_init(self, *args, **kwargs)

    AcceleratorState.__init__ = _fsdp_on_cpu
