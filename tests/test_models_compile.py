"""torch.compile(fullgraph=True) of a GC-TSM model: no graph breaks, same outputs as eager (compiled once)."""

from __future__ import annotations

import pytest
import torch

import runtime
from models import build_model


@pytest.mark.slow
def test_compiled_gc_tsm_matches_eager():
    torch.manual_seed(0)
    model = runtime.to_channels_last(build_model("gc_tsm_mini", 5, num_segments=4).eval())
    x = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)  # fullgraph: any graph break is an error
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


def test_training_step_traces_as_one_graph():
    # aot_eager traces forward and backward through AOTAutograd (BN buffer updates included) without the slow
    # C++ code generation; fullgraph=True makes a graph break (or a host sync that breaks it) fail the test.
    torch.manual_seed(0)
    model = build_model("gc_tsm_mini", 5, num_segments=4, dropout=0.0).train()  # no dropout: same outputs
    x = torch.randn(2, 4, 3, 32, 32)
    reference = build_model("gc_tsm_mini", 5, num_segments=4, dropout=0.0).train()
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, ref_out = compiled(x), reference(x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    grads = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-4, rtol=1e-3, msg=name)
    for name, buffer in reference.named_buffers():  # BN running statistics were updated the same way
        torch.testing.assert_close(dict(model.named_buffers())[name], buffer, msg=name)
