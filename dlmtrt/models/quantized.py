"""8-bit linear layers for a calibrated checkpoint (`dlmtrt calibrate`, dlmtrt/calibration/).

Three formats, chosen because they are what TensorRT and Hopper GPUs run natively:

* `fp8`: E4M3 weights with one scale per output channel, E4M3 activations with one static scale per tensor
  (calibrated). On CUDA, products of 1-4 rows go to our fp8 kernel (plugins/fp8_linear, when `make plugin`
  built it and a torch backend registered it), which reads the fp8 weights once for all rows: a batch-1
  cached step is bound by weight reads, and cuBLAS's FP8 GEMMs do not turn halved bytes into time at one row
  (measured on an H200: README, 8-bit calibration). More rows on a GPU with FP8 tensor cores (compute
  capability 8.9+) use `torch._scaled_mm` with row-wise scales; elsewhere the product is emulated exactly:
  the same E4M3 roundings, the product in the activation dtype.
* `int8-wo`: int8 weights, one scale per output channel; activations untouched (weight-only). The weights are
  dequantised to the activation dtype for the product (the emulation: it saves memory, not time, in PyTorch;
  the Q/DQ export is what a TensorRT engine would run).
* `w8a8`: SmoothQuant-style int8 weights (per output channel) and int8 activations (static per-tensor scale);
  the smoothing is folded into the RMSNorm weights before quantising, so this module only sees the smoothed
  input. `torch._int_mm` on CUDA where its shape rules allow, otherwise the exact integer product in fp32.

Stored tensors, under the linear's name: `weight` (float8_e4m3fn or int8), `weight_scale` (fp32 [out]),
`input_scale` (fp32 scalar; fp8 and w8a8 only), `bias` if any.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlmtrt.dtypes import QUANT_FORMATS as FORMATS
# The few-row fp8 kernel (dlmtrt.plugins.fp8_linear registers itself here on import: the model code cannot
# import the plugins stage); None until then, and QuantLinear uses torch._scaled_mm.
few_row_fp8 = None
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
INT8_MAX = 127.0


def fp8_supported(device: torch.device) -> bool:
    """Whether this device has FP8 tensor cores for `torch._scaled_mm` (Ada / Hopper and newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_weight(w: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    """(q, scale [out]) with one scale per output channel: w ~= q * scale[:, None]."""
    amax = w.detach().float().abs().amax(dim=1).clamp_min(1e-12)
    if fmt == "fp8":
        scale = amax / FP8_MAX
        q = (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    else:
        scale = amax / INT8_MAX
        q = torch.round(w.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_input(x: Tensor, scale: Tensor, fmt: str) -> Tensor:
    """Activations to the 8-bit grid of a static per-tensor scale (saturating)."""
    if fmt == "fp8":
        return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


class QuantLinear(nn.Module):
    """`nn.Linear` with 8-bit weights (and, for fp8 / w8a8, 8-bit activations); see the module docstring."""

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = False, device=None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        wdt = FP8 if fmt == "fp8" else torch.int8
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=wdt, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.input_scale = (nn.Parameter(torch.empty((), dtype=torch.float32, device=device), requires_grad=False)
                            if fmt != "int8-wo" else None)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype or torch.float32, device=device),
                                  requires_grad=False) if bias else None)

    @classmethod
    def from_linear(cls, lin: nn.Linear, fmt: str, input_scale: float | None) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, fmt, lin.bias is not None, device=lin.weight.device,
                dtype=lin.weight.dtype)
        w, s = quantize_weight(lin.weight, fmt)
        q.weight.data, q.weight_scale.data = w, s
        if q.input_scale is not None:
            if input_scale is None or not input_scale > 0:
                raise ValueError(f"{fmt} needs a positive calibrated input scale, got {input_scale}")
            q.input_scale.data = torch.tensor(float(input_scale), dtype=torch.float32, device=lin.weight.device)
        if lin.bias is not None:
            q.bias.data = lin.bias.detach().clone()
        return q

    @classmethod
    def concat(cls, parts: list["QuantLinear"]) -> "QuantLinear":
        """One module computing `parts` side by side (q|k|v, gate|up): they read the same input, so their
        calibrated input scales are equal (checked)."""
        p0 = parts[0]
        if any(p.fmt != p0.fmt for p in parts):
            raise ValueError("cannot fuse linear layers of different formats")
        if p0.input_scale is not None and any(not torch.equal(p.input_scale, p0.input_scale) for p in parts):
            raise ValueError("cannot fuse layers with different input scales")
        out = cls(p0.in_features, sum(p.out_features for p in parts), p0.fmt, p0.bias is not None,
                  device=p0.weight.device, dtype=p0.bias.dtype if p0.bias is not None else None)
        out.weight.data = torch.cat([p.weight.view(torch.uint8) for p in parts]).view(p0.weight.dtype)
        out.weight_scale.data = torch.cat([p.weight_scale for p in parts])
        if p0.input_scale is not None:
            out.input_scale.data = p0.input_scale.clone()
        if p0.bias is not None:
            out.bias.data = torch.cat([p.bias for p in parts])
        return out

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        if self.fmt == "int8-wo":
            y = F.linear(x2, self.dequantized_weight(dtype))
        elif self.fmt == "fp8":
            kernel = few_row_fp8
            if kernel is not None and kernel.usable(x2, self.weight):
                bias = self.bias.to(dtype) if self.bias is not None else None
                if torch.compiler.is_compiling():  # quantise here: it fuses into the kernel producing x
                    y = kernel.fp8_linear(quantize_input(x2, self.input_scale, "fp8"), self.weight,
                                          self.weight_scale, self.input_scale, bias, dtype)
                else:
                    y = kernel.fp8_linear(x2, self.weight, self.weight_scale, self.input_scale, bias)
                return y.reshape(*shape[:-1], self.out_features)
            xq = quantize_input(x2, self.input_scale, "fp8")
            if _scaled_mm_ok(x2, self):
                M = x2.shape[0]
                y = torch._scaled_mm(xq, self.weight.t(), scale_a=self.input_scale.expand(M, 1).contiguous(),
                                     scale_b=self.weight_scale[None, :], out_dtype=dtype)
            else:
                y = F.linear((xq.float() * self.input_scale).to(dtype), self.dequantized_weight(dtype))
        else:
            xq = quantize_input(x2, self.input_scale, "w8a8")
            if x2.is_cuda and x2.shape[0] > 16 and x2.shape[1] % 8 == 0 and self.out_features % 8 == 0:
                acc = torch._int_mm(xq, self.weight.t()).float()
            else:
                acc = F.linear(xq.float(), self.weight.float())  # exact while |sum| < 2^24
            y = (acc * (self.input_scale * self.weight_scale)).to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}"


def _scaled_mm_ok(x: Tensor, q: QuantLinear) -> bool:
    return (x.is_cuda and x.dtype == torch.bfloat16 and fp8_supported(x.device) and q.in_features % 16 == 0
            and q.out_features % 16 == 0)


QUANTIZABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


HEAD = "lm_head"


def quantizable_linears(model: nn.Module, head: bool = False) -> list[str]:
    """Names of the linear layers a calibrated checkpoint quantises: every projection of every block, and the
    output head with `head` (`calibrate --quantize-head`). By default the head stays in the model dtype: it reads
    the final hidden state that every decision is taken from, and TensorRT-LLM and Model Optimizer leave it
    unquantised by default too; but it is 1/15 of a 7B model's weights, so at one row it is 1/7 of an fp8 step.
    The embedding is a lookup, never a product, and always stays."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))
             and n.rsplit(".", 1)[-1] in QUANTIZABLE]
    return names + [HEAD] if head else names


def swap_in(model: nn.Module, fmt: str, names: list[str] | None = None) -> None:
    """Replace the named `nn.Linear` modules by empty `QuantLinear`s of `fmt` (on the modules' device, meta
    included): the skeleton a quantised checkpoint is loaded into."""
    for name in names if names is not None else quantizable_linears(model):
        lin = model.get_submodule(name)
        model.set_submodule(name, QuantLinear(lin.in_features, lin.out_features, fmt, lin.bias is not None,
                                              device=lin.weight.device, dtype=lin.weight.dtype))
