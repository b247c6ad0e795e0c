"""Marking quantized Linears so the exported graph says which MatMul belongs to which layer.

Every Linear listed in the quant state is replaced (in the exporter's own model copy) by
:class:`MarkedLinear`, whose matmul is the custom op ``qvlm_export::qlinear(x, weight,
layer)``. Eagerly it is ``x @ weight.T``; the ONNX translation emits one ``qvlm.QLinear``
node carrying the layer name as an attribute. The QDQ pass (:mod:`.passes`) then swaps
each such node for integer initializers + Q/DQ + MatMul, keyed by that name: no
matching of initializers by name mangling or by value is needed. The bias stays a
separate float ``Add`` (TensorRT: no Q/DQ on biases).
"""

from __future__ import annotations

import torch
from torch import nn

QDOMAIN = "qvlm"
QOP = "QLinear"

_schema_registered = False


@torch.library.custom_op("qvlm_export::qlinear", mutates_args=())
def qlinear(x: torch.Tensor, weight: torch.Tensor, layer: str) -> torch.Tensor:
    """``x @ weight.T`` tagged with the quant-state layer name (eager semantics of the marker)."""
    return nn.functional.linear(x, weight)


@qlinear.register_fake
def _qlinear_fake(x: torch.Tensor, weight: torch.Tensor, layer: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _register_schema() -> None:
    """Declare ``qvlm.QLinear`` to ONNX so onnxscript can emit it (the QDQ pass removes every one)."""
    global _schema_registered
    import onnx
    from onnx.defs import OpSchema

    if _schema_registered or onnx.defs.has(QOP, QDOMAIN):
        _schema_registered = True
        return
    param = OpSchema.FormalParameter
    onnx.defs.register_schema(OpSchema(
        QOP, QDOMAIN, 1,
        inputs=[param("x", "T"), param("weight", "T")], outputs=[param("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float input, weight and output")],
        attributes=[OpSchema.Attribute("layer", OpSchema.AttrType.STRING, "quant-state layer name")],
    ))
    _schema_registered = True


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: the marker op -> one ``qvlm.QLinear`` node."""
    import onnxscript

    _register_schema()
    opset = onnxscript.values.Opset(QDOMAIN, 1)

    def qlinear_onnx(x, weight, layer: str):
        return opset.QLinear(x, weight, layer=layer)

    return {torch.ops.qvlm_export.qlinear.default: qlinear_onnx}


class MarkedLinear(nn.Module):
    """A Linear whose matmul exports as ``qvlm.QLinear(layer=name)``; the weight is the simulated one."""

    def __init__(self, layer: str, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.layer = layer
        # Shares the replaced module's storage (no clone): the exporter's model is its own,
        # and a copy per Linear would hold a second model's worth of weights.
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.qvlm_export.qlinear(x, self.weight.to(x.dtype), self.layer)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def mark_linears(model: nn.Module, layers: list[str]) -> nn.Module:
    """Replace each named module by a :class:`MarkedLinear` (in place on the exporter's own copy).

    ``model`` must already carry the simulated weights (overrides applied, weights
    dequantized) so eager outputs equal the simulated model's except for activation
    fake-quant, which only exists in the graph.
    """
    from ..errors import QvlmError
    from ..quant.modules import set_submodule

    for name in layers:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise QvlmError(f"the quant state names layer {name!r}, which the model does not have; "
                            "export with the model the state was made for (--model)") from None
        weight, bias = module.weight, getattr(module, "bias", None)
        set_submodule(model, name, MarkedLinear(name, weight, bias))
    return model
