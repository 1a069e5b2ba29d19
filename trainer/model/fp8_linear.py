"""`base_model_precision: "fp8-native"`: frozen linear layers stored once in float8 and computed with fp8 matmuls.

Each frozen `nn.Linear` of the transformer blocks becomes an `Fp8Linear`: its weight is stored as
float8 e4m3 with one float32 scale per output channel (about half the bytes of bf16), and both the
forward matmul and the input-gradient matmul of the backward pass run as fp8 x fp8 matmuls with
float32 accumulation (`torch._scaled_mm`). Activations and output gradients are quantised per row
(one scale per token) on the fly. The weights get no gradient, so nothing else is needed.

The LoRA stays in bf16/float32 beside the layer: `Fp8Linear` is an `nn.Linear`, so peft wraps it as
it wraps any linear layer, and the exported LoRA has the keys of the unquantised model.

The numerics contract, on every device: out = (q(x) * s_x) @ (q(W) * s_W)^T, with q() rounding to
e4m3 and the products accumulated in float32. Where `torch._scaled_mm` cannot run (GPUs older than
Ada/Hopper), the same quantised values are dequantised and multiplied in float32: the same contract,
without the speed.
"""

import fnmatch
import functools

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
_TINY = 1e-12  # the scale of an all-zero row: its values quantise to 0


def quantize_rows(x: torch.Tensor, column_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor (times `column_scale` per column, if given) as e4m3 values and one float32 scale per row."""
    x = x.float()
    if column_scale is not None:
        x = x * column_scale
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(_TINY) / E4M3_MAX
    return (x / scale).to(E4M3), scale


@functools.cache
def _fused_quantize_rows():
    """`quantize_rows` as one fused GPU kernel (eager PyTorch would make five passes over the activation)."""
    return torch.compile(quantize_rows, dynamic=True)


def _quantize(x: torch.Tensor, column_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda and not torch.compiler.is_compiling():  # inside a compiled block the block's graph fuses it
        return _fused_quantize_rows()(x, column_scale)
    return quantize_rows(x, column_scale)


@functools.cache
def native_fp8(device: torch.device) -> bool:
    """Can `torch._scaled_mm` multiply row-wise scaled e4m3 matrices on this device? (CUDA: compute capability 8.9+.)"""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False
    try:
        a = torch.ones(16, 16, device=device).to(E4M3)
        ones = torch.ones(16, 1, device=device)
        out = torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t(), out_dtype=torch.bfloat16)
        return bool(out.float().eq(16).all())
    except (RuntimeError, NotImplementedError):
        return False


def fp8_matmul(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype, native: bool
) -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale) for e4m3 `a` [M, K] (row-major) and `b` [K, N] (column-major),
    `a_scale` [M, 1] and `b_scale` [1, N], accumulated in float32; `native` as `native_fp8` says."""
    if native:
        # CUDA's row-wise fp8 kernels write bf16 only; anything else is a cast of that
        kernel_dtype = torch.bfloat16 if a.is_cuda else out_dtype
        out = torch._scaled_mm(a, b, scale_a=a_scale, scale_b=b_scale, out_dtype=kernel_dtype)
        return out if out.dtype == out_dtype else out.to(out_dtype)
    with torch.autocast(a.device.type, enabled=False):  # the contract is a float32 product
        return ((a.float() * a_scale) @ (b.float() * b_scale)).to(out_dtype)


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """What nn.Linear would return: the autocast dtype under autocast, else the input's dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class Fp8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with e4m3 operands; the backward returns dL/dx = dL/dy W, also as an fp8 matmul."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, native):
        out_dtype = _output_dtype(x)
        rows = x.reshape(-1, x.shape[-1])
        xq, x_scale = _quantize(rows)
        out = fp8_matmul(xq, x_scale, weight.t(), weight_scale[None, :], out_dtype, native)
        if bias is not None:
            out = out + bias.to(out_dtype)
        ctx.save_for_backward(weight, weight_scale)
        ctx.input_shape, ctx.input_dtype, ctx.native = x.shape, x.dtype, native
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        weight, weight_scale = ctx.saved_tensors
        # dL/dy W = (dL/dy * s_W per column) @ q(W): the weight's scales fold into the gradient's rows
        gq, g_scale = _quantize(grad_out.reshape(-1, grad_out.shape[-1]), weight_scale[None, :])
        weight_t = weight.t().contiguous()  # [in, out] row-major = q(W) as a column-major [out, in] operand
        ones = torch.ones(1, weight.shape[1], device=weight.device)
        grad_in = fp8_matmul(gq, g_scale, weight_t.t(), ones, ctx.input_dtype, ctx.native)
        return grad_in.reshape(ctx.input_shape), None, None, None, None


class Fp8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is float8 e4m3 with a float32 scale per output channel."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a full-precision weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # peft casts the LoRA it adds to this dtype, as it would beside the original layer
        self.compute_dtype = linear.weight.dtype
        weight, scale = quantize_rows(linear.weight.detach())
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scale.flatten())
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.native = native_fp8(weight.device)  # set again by `use_native_fp8` once the layer is on its device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Fp8LinearFunction.apply(x, self.weight, self.weight_scale, self.bias, self.native)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def reset_parameters(self) -> None:  # frozen, quantised weights are never re-initialised
        pass

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        if self.weight.dtype != E4M3:  # e.g. model.to(torch.bfloat16): the values would lose their scales
            raise TypeError("Fp8Linear holds float8 weights with per-channel scales: move it between devices, never cast it")
        return result


def convert_linears_to_fp8(module: nn.Module, exclude: list[str], prefix: str = "") -> list[str]:
    """Replace every plain nn.Linear under `module` (full names `prefix` + name, fnmatch patterns in
    `exclude` skipped) by an Fp8Linear, in place on the layer's device; returns the converted names."""
    converted = []
    for name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            full_name = ".".join(part for part in (prefix, name, child_name) if part)
            if type(child) is not nn.Linear or any(fnmatch.fnmatchcase(full_name, p) for p in exclude):
                continue
            setattr(parent, child_name, Fp8Linear(child))
            converted.append(full_name)
    return converted


def use_native_fp8(module: nn.Module, device: torch.device) -> None:
    """After the model reached `device`: each Fp8Linear uses `torch._scaled_mm` where that device can."""
    native = native_fp8(device)
    for layer in module.modules():
        if isinstance(layer, Fp8Linear):
            layer.native = native
