"""Validation on a small card: the VL encoder, the VAE and the transformer take turns on it.

Validation encodes the prompts and references (Qwen2.5-VL, 15.5 GiB in bf16, and the VAE), then
denoises with the transformer (19 GiB with int8), then decodes with the VAE. Where the three do not
fit together, each phase has only its own components on the card: the others wait in CPU memory. The
training transformer is moved as raw bytes (`tensor.data`), so its Parameter objects, the optimizer's
and its LoRA stay the same; block swap's slots are emptied first and its swapped blocks stay on the host.
Moving data changes no value: validation gives the same edits either way (tests/trainer/evaluation).
"""

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

PHASES = {"encode": ("text_encoder", "vae"), "generate": ("transformer",), "decode": ("vae",)}
WORKING_MARGIN = 3 * 2**30  # activations of an encode or decode beside the weights


def _leaves(module: torch.nn.Module):
    """Every plain tensor holding the module's parameters and buffers (through quanto's subclasses)."""
    seen = set()

    def walk(t):
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            for name in names:
                yield from walk(getattr(t, name))
        elif id(t) not in seen:
            seen.add(id(t))
            yield t

    for m in module.modules():
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            yield from walk(t)
            quant_state = getattr(t, "quant_state", None)  # bitsandbytes 4-bit
            if quant_state is not None:
                for inner in (quant_state.absmax, quant_state.code):
                    if isinstance(inner, torch.Tensor):
                        yield from walk(inner)


def device_bytes(module: torch.nn.Module | None, device: torch.device) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in _leaves(module) if t.device.type == device.type)


def host_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in _leaves(module) if t.device.type == "cpu")


def _indexed(device: torch.device) -> torch.device:
    """`cuda` as `cuda:<current>`: torch.cuda's memory queries refuse a CUDA device without an index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class TakingTurns:
    """`with turns.phase("encode"): ...` puts that phase's components on `device` and, when they take
    turns, everything else in CPU memory. `one_at_a_time=None` decides from the free memory."""

    def __init__(self, pipe, device: torch.device, one_at_a_time: bool | None = None):
        self.pipe, self.device = pipe, _indexed(torch.device(device))
        if one_at_a_time is None:
            one_at_a_time = self.device.type == "cuda" and not self._all_fit()
        self.one_at_a_time = one_at_a_time
        self._parked: dict[str, list[torch.Tensor]] = {}
        for name in ("text_encoder", "vae"):  # loaded into CPU memory
            component = getattr(pipe, name, None)
            if component is None:
                continue
            if one_at_a_time:
                self._parked[name] = [t for t in _leaves(component) if t.device.type == "cpu"]
            else:  # the fast path: everything on the card, as before
                component.to(self.device)

    def _all_fit(self) -> bool:
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if fraction is not None:
            cap = fraction(self.device) * torch.cuda.get_device_properties(self.device).total_memory
            free = min(free, cap - torch.cuda.memory_allocated(self.device))
        wanted = sum(host_bytes(getattr(self.pipe, name, None)) for name in ("text_encoder", "vae"))
        return wanted + WORKING_MARGIN <= free

    @contextmanager
    def phase(self, name: str):
        if self.one_at_a_time:
            wanted = PHASES[name]
            for component in ("transformer", "text_encoder", "vae"):
                if component not in wanted:
                    self._off(component)
            for component in wanted:
                self._on(component)
        yield

    def restore(self) -> None:
        """The transformer back on the card (training continues), the encoders in CPU memory."""
        if self.one_at_a_time:
            self._off("text_encoder")
            self._off("vae")
            self._on("transformer")

    def _off(self, name: str) -> None:
        module = getattr(self.pipe, name, None)
        if module is None or name in self._parked:
            return
        swap = getattr(module, "_block_swap", None)
        if swap is not None:
            swap.release_all()  # its slots' blocks go back to their host copies
        moved = [t for t in _leaves(module) if t.device.type == self.device.type]
        for t in moved:
            t.data = t.data.to("cpu")
        self._parked[name] = moved
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _on(self, name: str) -> None:
        moved = self._parked.pop(name, None)
        if moved is None:
            return
        for t in moved:
            t.data = t.data.to(self.device)
