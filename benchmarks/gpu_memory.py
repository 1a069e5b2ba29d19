"""Peak memory and step time of the full-size (20B) transformer per card size: block swap and 4-bit bases.

Each case trains STEPS steps as the recipe's loop does (bf16 autocast, gradient checkpointing,
`offload_activations`, `offload_optimizer_state`, gradient clipping, AdamW, LoRA rank 32) under
`torch.cuda.set_per_process_memory_fraction` set to the card being claimed, so that the allocator
gives cached blocks back and fails where that card would. Run it in the same command as the
baseline (`.bench/diffusers_lora_baseline.py`, CASES=int8_ckpt SHAPES=1x1300,3x300):
benchmarks/gpu_memory.sh does both.

CASES (comma-separated) `precision:blocks_to_swap:card_GB:refsxtext`, e.g. `int8:10:24:3x300`
(card `-`: no cap). precision `int8` (int8-quanto, quantised block by block as the recipe loads it)
or `nf4` (bitsandbytes Linear4bit nf4, bf16 compute, no double quantisation, as
`trainer.model.quantization.bnb_quantization_config`). Cases of one precision share one model: block swap
is closed and installed again between them. LOAD=`blocks:card` first loads the int8 model exactly as
`LoraTrainingRecipe._setup_transformer_with_lora` does (bf16 in CPU memory, `quantize_transformer` with
the swapped blocks left in CPU memory, `move_to_device_except`, LoRA, `BlockSwap`) under that card's cap.

TINY=1 runs a 2-block model with small latents on the CPU to check the script; never for figures.
Prints one JSON line per case and a table last; writes gpu_memory.json to $OUT.
"""

import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_train_step import CUDA, DEVICE, TINY, build_full_size_transformer, empty_cache, gib, reset_peak, sample, sync  # noqa: E402
from trainer.config.parsing import parse_train_config  # noqa: E402
from trainer.model.block_swap import BlockSwap, frozen_leaf_tensors, move_to_device_except, swapped_block_indices  # noqa: E402
from trainer.model.lora import add_lora  # noqa: E402
from trainer.model.memory import OffloadActivations, offload_optimizer_state  # noqa: E402
from trainer.model.memory_estimate import CARD_VISIBLE, GiB, SequenceShape, TransformerShape, estimate_training_memory  # noqa: E402
from trainer.model.quantization import quantize_transformer, repeated_blocks  # noqa: E402
from trainer.training.loss import flow_matching_loss  # noqa: E402

RANK = int(os.environ.get("LORA_RANK", 32))
STEPS = int(os.environ.get("STEPS", 5))  # the first two are warm-up
DEFAULT_CASES = "int8:0:-:1x1300,int8:0:-:3x300,int8:12:24:1x1300,int8:12:24:3x300,int8:28:16:1x1300,int8:42:12:1x1300"
CASES = [c.split(":") for c in os.environ.get("CASES", DEFAULT_CASES).split(",") if c]
LOAD = os.environ.get("LOAD", "")  # e.g. "42:12"
PRECISIONS = {"int8": "int8-quanto", "nf4": "nf4-bnb"}


def cap(card: str) -> None:
    """The allocator's limit: the card's visible memory (a "24 GB" card shows ~23.6 GiB), or none."""
    if not CUDA:
        return
    empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = 1.0 if card == "-" else min(1.0, float(card) * CARD_VISIBLE * GiB / total)
    torch.cuda.set_per_process_memory_fraction(fraction)


def recipe_config(precision: str, blocks: int):
    return parse_train_config({
        "base_model_precision": PRECISIONS[precision], "quantize_via": "accelerator", "gradient_checkpointing": True,
        "offload_activations": True, "offload_optimizer_state": True, "blocks_to_swap": blocks, "lora_rank": RANK,
    })


def load_int8_like_recipe(blocks: int, card: str) -> tuple:
    """bf16 in CPU memory (as load_transformer returns it), then the recipe's setup under the card's cap."""
    torch.manual_seed(0)
    model = build_full_size_transformer(**TINY).to("cpu")
    empty_cache()
    config = recipe_config("int8", blocks)
    cap(card)
    reset_peak()
    start = time.perf_counter()
    swapped = swapped_block_indices(len(repeated_blocks(model)), blocks)
    quantize_transformer(model, config, DEVICE, stay_on_cpu=swapped)
    move_to_device_except(model, DEVICE, set(swapped))
    params = add_lora(model, RANK, float(RANK), seed=0)
    model.enable_gradient_checkpointing()
    swap = BlockSwap(model, swapped, DEVICE) if swapped else None
    sync()
    info = {"load_blocks_to_swap": blocks, "load_card_GB": card, "load_s": time.perf_counter() - start,
            "load_peak_allocated_GiB": gib("max_memory_allocated"), "load_peak_reserved_GiB": gib("max_memory_reserved")}
    cap("-")
    return model, params, swap, info


def build_nf4() -> tuple:
    """The block linears as bitsandbytes nf4 layers (quantised on the GPU from random bf16 weights)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = build_full_size_transformer(**TINY)
    for _, block in repeated_blocks(model):
        for name, linear in list(block.named_modules()):
            if type(linear) is not torch.nn.Linear:
                continue
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=False, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=False,
                                             quant_type="nf4", module=layer).to(DEVICE)
            if linear.bias is not None:
                layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, attr, layer)
    # lay the packed weights out afresh, as a load from disk would: the bf16 originals they were made from
    # left holes between them that the allocator could not give back (seen as 17 GiB reserved for 12 allocated)
    leaves = [t for _, block in repeated_blocks(model) for t in frozen_leaf_tensors(block) if t.device.type == "cuda"]
    for t in leaves:
        t.data = t.data.cpu()
    empty_cache()
    for t in leaves:
        t.data = t.data.to(DEVICE)
    model.is_loaded_in_4bit = True  # as diffusers marks a bnb-loaded model: peft then wraps with its bnb LoRA layer
    params = add_lora(model, RANK, float(RANK), seed=0)
    model.enable_gradient_checkpointing()
    return model, params, None


def train(model, params, shape: tuple[int, int], steps: int) -> tuple[list[float], list[float]]:
    """The recipe's step: offloaded block inputs and optimizer state, clipping, AdamW."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    if CUDA:
        offload_optimizer_state(optimizer)
    offload = OffloadActivations() if CUDA else nullcontext()
    batch = sample(*shape)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    times, losses = [], []
    for _ in range(steps):
        sigma = torch.rand(1, device=DEVICE, generator=generator)
        noise = torch.randn(1, 16, batch.target.shape[-2], batch.target.shape[-1], device=DEVICE, generator=generator)
        sync()
        start = time.perf_counter()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16), offload:
            loss = flow_matching_loss(model, batch, sigma, noise, torch.bfloat16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return times, losses


def h2d_gib_per_s() -> float:
    if not CUDA:
        return 0.0
    host = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(GiB, dtype=torch.uint8, device=DEVICE)
    device.copy_(host, non_blocking=True)
    sync()
    start = time.perf_counter()
    for _ in range(4):
        device.copy_(host, non_blocking=True)
    sync()
    return 4 / (time.perf_counter() - start)


def write(info: dict, rows: list[dict]) -> None:
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_memory.json"), "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


def main() -> None:
    cuda_started_early = CUDA and torch.cuda.is_initialized()
    if CUDA:
        from trainer.model.memory import use_expandable_segments

        use_expandable_segments()  # as training asks for it (before CUDA starts)
    info = {"cuda_initialised_before_allocator_setting": cuda_started_early,"gpu": torch.cuda.get_device_name(0) if CUDA else "cpu", "torch": torch.__version__,
            "total_GiB": torch.cuda.get_device_properties(0).total_memory / GiB if CUDA else 0.0,
            "h2d_pinned_GiB_per_s": h2d_gib_per_s(), "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    if CUDA:
        torch.empty(1, device=DEVICE)
        info["expandable_segments_active"] = any(seg.get("is_expandable", False) for seg in torch.cuda.memory_snapshot())
    print(json.dumps(info), flush=True)
    rows, model, params, swap = [], None, None, None
    reference: dict[str, list[torch.Tensor]] = {}
    for precision in dict.fromkeys(c[0] for c in CASES):
        model = params = swap = None  # the previous precision's model, its pinned buffers and slots go
        empty_cache()
        if precision == "int8":
            blocks, card = (LOAD.split(":") if LOAD else ("0", "-"))
            model, params, swap, load_info = load_int8_like_recipe(int(blocks), card)
            info.update(load_info)
            print(json.dumps(load_info), flush=True)
        else:
            if not CUDA:
                print(json.dumps({"skipped": precision, "why": "bitsandbytes needs CUDA"}), flush=True)
                model = None
                continue
            try:
                model, params, swap = build_nf4()
            except Exception as error:  # noqa: BLE001 - a failed 4-bit build must not lose the int8 figures
                print(json.dumps({"failed": precision, "error": repr(error)[:500]}), flush=True)
                model = None
                continue
        model.train()
        init = [p.detach().clone() for p in params]
        for _, blocks, card, shape_text in (c for c in CASES if c[0] == precision):
            blocks, shape = int(blocks), tuple(map(int, shape_text.split("x")))
            if swap is None or swap.order != swapped_block_indices(len(swap.blocks), blocks):
                if swap is not None:
                    swap.close()
                    empty_cache()
                indices = swapped_block_indices(len(repeated_blocks(model)), blocks)
                swap = BlockSwap(model, indices, DEVICE) if indices else None
            with torch.no_grad():
                for p, v in zip(params, init):
                    p.copy_(v)
            cap(card)
            reset_peak()
            n_refs, text = shape
            predicted = estimate_training_memory(recipe_config(precision, blocks), SequenceShape(4096, (4096,) * n_refs, text),
                                                 TransformerShape(**({} if not TINY else {"num_layers": 2})))
            row = {"case": f"{precision} swap {blocks}", "card_GB": card, "shape": shape_text, "blocks_to_swap": blocks,
                   "predicted_allocated_GiB": round(predicted.allocated, 2), "predicted_reserved_GiB": round(predicted.reserved, 2)}
            copies_before = swap.copies if swap else 0
            try:
                times, losses = train(model, params, shape, STEPS)
                steady = sorted(times[2:]) or times
                final = [p.detach().float().cpu() for p in params]
                key = f"{precision} {shape_text}"
                first = reference.setdefault(key, final)
                row.update({
                    "s_per_step_median": steady[len(steady) // 2], "s_min": steady[0],
                    "peak_allocated_GiB": gib("max_memory_allocated"), "peak_reserved_GiB": gib("max_memory_reserved"),
                    "block_copies_per_step": ((swap.copies if swap else 0) - copies_before) / STEPS,
                    "losses": losses,
                    "lora_max_abs_diff_vs_first_case_of_shape": max(float((a - b).abs().max()) for a, b in zip(final, first)),
                })
            except torch.cuda.OutOfMemoryError:
                row.update(oom=True, peak_allocated_GiB=gib("max_memory_allocated"), peak_reserved_GiB=gib("max_memory_reserved"))
            except Exception as error:  # noqa: BLE001 - one broken case must not lose the others
                import traceback

                traceback.print_exc()
                row.update(error=repr(error)[:300])
            for p in params:
                p.grad = None
            cap("-")
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(info, rows)  # after every case: a later failure keeps what was measured
    print(f"\n{info['gpu']}, H2D pinned {info['h2d_pinned_GiB_per_s']:.1f} GiB/s"
          + (f"; recipe load (swap {info['load_blocks_to_swap']}, card {info['load_card_GB']}): peak reserved "
             f"{info['load_peak_reserved_GiB']:.2f} GiB, {info['load_s']:.0f} s" if "load_s" in info else ""))
    print("case | card GB | refs x text | s/step | peak alloc GiB | peak reserved GiB | predicted alloc/res | copies/step | LoRA diff")
    for r in rows:
        if r.get("error"):
            print(f"{r['case']} | {r['card_GB']} | {r['shape']} | ERROR {r['error'][:80]}")
        elif r.get("oom"):
            print(f"{r['case']} | {r['card_GB']} | {r['shape']} | OOM | {r['peak_allocated_GiB']:.2f} | {r['peak_reserved_GiB']:.2f} | "
                  f"{r['predicted_allocated_GiB']}/{r['predicted_reserved_GiB']} | - | -")
        else:
            print(f"{r['case']} | {r['card_GB']} | {r['shape']} | {r['s_per_step_median']:.2f} | {r['peak_allocated_GiB']:.2f} | "
                  f"{r['peak_reserved_GiB']:.2f} | {r['predicted_allocated_GiB']}/{r['predicted_reserved_GiB']} | "
                  f"{r['block_copies_per_step']:.0f} | {r['lora_max_abs_diff_vs_first_case_of_shape']:.1e}")


if __name__ == "__main__":
    main()
