"""Graph passes enforce their pre/postconditions, name the pass and condition on failure, and say what changed."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from test_export_qdq import layer, qlinear_graph

from qvlm_export.errors import QvlmError
from qvlm_export.export.passes import (
    DEFAULT_PASSES,
    NO_QVLM_LEFT,
    GraphPass,
    PassContext,
    lower_linears,
    run_passes,
    sort_initializers,
)
from qvlm_export.export.qlinear import QDOMAIN


def _ctx(lq) -> PassContext:
    return PassContext(np.dtype(np.float32), {"fc": lq})


def test_results_say_what_each_pass_changed():
    _, lq = layer("w8a8")
    model = qlinear_graph(lq.dequantized_weight().numpy())
    model.graph.node[0].doc_string = "traced at x.py:1"
    results = run_passes(model, _ctx(lq), DEFAULT_PASSES, "test")
    assert [r.name for r in results] == ["strip_metadata", "lower_linears", "remove_unused_initializers",
                                         "sort_initializers"]
    strip, lower, unused, _ = results
    assert strip.detail == {"stripped": 1} and strip.changed and strip.nodes[0] == strip.nodes[1]
    assert lower.detail == {"lowered": 1, "quantized": 1}
    assert lower.nodes[1] - lower.nodes[0] == 3  # QLinear -> Q, DQ (input), DQ (weight), MatMul
    assert unused.initializers[1] == unused.initializers[0] - 1 and unused.changed  # the traced float weight


def test_a_failed_precondition_names_pass_graph_and_condition():
    model = qlinear_graph(np.zeros((3, 4), np.float32))
    model.graph.node[0].op_type = "Mystery"
    with pytest.raises(QvlmError) as info:
        run_passes(model, PassContext(np.dtype(np.float32), {}), [lower_linears], "vision")
    assert str(info.value) == ("export pass lower_linears failed on the vision graph: precondition 'qvlm nodes are "
                               f"QLinears with a constant 2-D float weight' does not hold: unexpected {QDOMAIN}.Mystery "
                               f"node {model.graph.node[0].name!r}")
    model = qlinear_graph(np.zeros((3, 4), np.float16))
    with pytest.raises(QvlmError, match=r"weight is float16\[3, 4\], expected a 2-D float32 tensor"):
        run_passes(model, PassContext(np.dtype(np.float32), {}), [lower_linears], "vision")


def test_a_failed_postcondition_names_pass_graph_and_condition():
    model = qlinear_graph(np.zeros((3, 4), np.float32))
    lazy = GraphPass("lazy_lowering", lambda m, c: None, ensures=(NO_QVLM_LEFT,))
    with pytest.raises(QvlmError, match=r"^export pass lazy_lowering failed on the decoder graph: postcondition "
                                        r"'no qvlm nodes or opset' does not hold: 1 qvlm nodes remain after lowering"):
        run_passes(model, PassContext(np.dtype(np.float32), {}), [lazy], "decoder")


def test_duplicate_initializers_are_refused_before_sorting():
    model = qlinear_graph(np.zeros((3, 4), np.float32))
    model.graph.initializer.extend([helper.make_tensor("b", 1, [1], [0.0]), helper.make_tensor("b", 1, [1], [1.0])])
    with pytest.raises(QvlmError, match="sort_initializers failed on the g graph: precondition 'initializer names "
                                        "are unique' does not hold: duplicate initializer names"):
        run_passes(model, PassContext(np.dtype(np.float32), {}), [sort_initializers], "g")
