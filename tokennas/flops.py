"""FLOPs (multiply-accumulates, as fvcore and the papers count them) and parameter counts.

``method="analytic"`` dispatches to the config's closed form (no model is built); ``method="fvcore"``
traces the built model in eval mode with fvcore, plus handles for the ops fvcore misses:
``aten::scaled_dot_product_attention`` (QK^T and AV) and bicubic upsampling. Ops that do no
multiply-accumulate (elementwise maths, softmax, pooling, indexing) are declared zero-cost here,
so that ``unsupported_ops()`` of a trace lists only ops nobody has decided about.
"""

from __future__ import annotations

from math import nan, prod
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, build_model, load_config

METHODS = ("analytic", "fvcore")
MAX_FLOPS = 10**15  # per image: about a thousand ViT-H/14 passes at 518px; a larger budget is a typo

ZERO_COST_OPS = (
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
    "aten::softmax", "aten::gelu", "aten::silu", "aten::relu", "aten::sigmoid", "aten::tanh", "aten::exp",
    "aten::mean", "aten::sum", "aten::abs", "aten::pow", "aten::sqrt", "aten::neg", "aten::clamp",
    "aten::max_pool1d", "aten::max_pool2d", "aten::avg_pool2d", "aten::max", "aten::topk", "aten::sort",
    "aten::argsort", "aten::gather", "aten::scatter", "aten::index", "aten::index_select", "aten::where",
    "aten::cos", "aten::sin", "aten::floor", "aten::ceil", "aten::remainder", "aten::eq", "aten::ne",
    "aten::lt", "aten::gt", "aten::le", "aten::ge", "aten::cumsum", "aten::arange", "aten::linspace",
    "aten::repeat_interleave", "aten::dropout", "aten::bernoulli_", "aten::masked_fill",
    "aten::scatter_add", "aten::one_hot", "aten::log", "aten::fill_", "aten::zero_", "aten::rand",
    "aten::hardswish", "aten::hardswish_", "aten::ones_like", "aten::linalg_vector_norm", "aten::clamp_min",
    "aten::expand_as",
)


def _shape(value: Any) -> list[int]:
    return value.type().sizes()


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """QK^T plus AV for ``scaled_dot_product_attention(q, k, v)``: q (..., L, E), k (..., S, E), v (..., S, Ev)."""
    q, k, v = (_shape(x) for x in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def bicubic_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """16 taps per output element, as fvcore counts 4 for bilinear."""
    return 16 * prod(_shape(outputs[0]))


EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::upsample_bicubic2d": bicubic_flop_jit,
}


def fvcore_analysis(model: torch.nn.Module, config: ModelConfig):
    """An fvcore ``FlopCountAnalysis`` of ``model`` on one image of the config's size, in eval mode."""
    from fvcore.nn import FlopCountAnalysis

    model.eval()
    image = torch.zeros(1, config.in_chans, config.img_size, config.img_size)
    analysis = FlopCountAnalysis(model, image).set_op_handle(**EXTRA_HANDLES)
    analysis.set_op_handle(**dict.fromkeys(ZERO_COST_OPS))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return analysis


def flops_by_module(name_or_config: str | Path | ModelConfig, method: str = "analytic") -> dict[str, int]:
    """Per top-level module MACs; the keys are those of the config's closed form."""
    config = load_config(name_or_config)
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(METHODS)}, got {method!r}")
    analytic = config.flops_by_module()
    if method == "analytic":
        return analytic
    analysis = fvcore_analysis(build_model(config), config)
    with torch.no_grad():
        per_module = analysis.by_module()
    out = {name: int(per_module.get(name, 0)) for name in analytic}
    rest = int(analysis.total()) - sum(out.values())
    if rest:
        out["(other)"] = rest
    return out


def count_flops(name_or_config: str | Path | ModelConfig, method: str = "analytic") -> int:
    """MACs of one forward pass at the config's input size."""
    return sum(flops_by_module(name_or_config, method).values())


def count_params(name_or_config: str | Path | ModelConfig) -> int:
    """Exact parameter count, from the config alone."""
    return load_config(name_or_config).num_params()


def parse_flops(text: str) -> int:
    """'4G', '30M', '1.5k' or a plain integer, in MACs: at least 1 and at most ``MAX_FLOPS``."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    raw = str(text).strip()
    scale = units.get(raw[-1:].lower(), 1) if raw and raw[-1].isalpha() else 1
    number = raw[:-1] if scale != 1 else raw
    try:
        value = float(number) * scale
    except ValueError:
        value = nan
    # nan, inf and 1e400 parse as floats; below one MAC or above MAX_FLOPS is a typo, not a budget
    if not 1 <= value <= MAX_FLOPS or (scale == 1 and raw[-1:].isalpha()):
        raise ValueError(f"invalid FLOPs budget {text!r}; expected a positive finite number of MACs with an "
                         "optional k/M/G/T suffix, such as 30M or 4G")
    return int(value)


def parse_budget(text: str, reference: int | None = None, what: str = "the parent") -> int:
    """A budget as ``parse_flops`` reads it, or a share of ``reference`` MACs: ``50%`` (``what`` names the
    reference in the error when there is none)."""
    raw = str(text).strip()
    if not raw.endswith("%"):
        return parse_flops(raw)
    if reference is None:
        raise ValueError(f"invalid FLOPs budget {text!r}: a share of MACs needs {what} (--parent)")
    try:
        share = float(raw[:-1])
    except ValueError:
        share = nan
    if not 0 < share <= 100:
        raise ValueError(f"invalid FLOPs budget {text!r}; expected a share above 0% and at most 100%, such as 50%")
    return max(1, int(reference * share / 100))


def format_flops(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"
