"""torch.compile of the training step: one graph, no breaks, the same loss and gradients as eager."""

import pytest
import torch
from torch.testing import assert_close

from lego_lightning import SupervisedExitLM

LAYERS = {
    "gpt2": {},
    "llama": {
        "positions": "rotary",
        "n_kv_heads": 1,
        "norm": "rmsnorm",
        "activation": "swiglu",
        "qkv_bias": False,
        "bias": False,
    },
}


def module(layer: str) -> SupervisedExitLM:
    torch.manual_seed(0)
    return SupervisedExitLM(
        vocab_size=40, n_layers=2, d_model=16, n_heads=2, max_seq_len=16, loss_chunk_size=8,
        stages=[{"layers": [1, 1]}, {"layers": [2, 2]}], **LAYERS[layer],
    )  # fmt: skip


def loss_of(m: SupervisedExitLM):
    return lambda idx: sum(m.exit_losses(idx, idx).values())


@pytest.mark.parametrize("layer", list(LAYERS))
def test_the_training_loss_traces_as_one_graph(layer):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss_of(module(layer)))(torch.randint(0, 40, (2, 16)))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("layer", ["llama"])
def test_the_compiled_loss_and_gradients_equal_eager(layer):
    idx = torch.randint(0, 40, (2, 16))
    eager, compiled = module(layer), module(layer)
    loss_of(eager)(idx).backward()
    torch._dynamo.reset()
    loss = torch.compile(loss_of(compiled), backend="aot_eager", fullgraph=True)(idx)  # forward and backward traced
    loss.backward()
    assert_close(loss, loss_of(eager)(idx))
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert_close(b.grad, a.grad, msg=name)


def test_the_training_loss_with_layer_dropout_traces_as_one_graph_and_equals_eager():
    m = module("llama")
    idx = torch.randint(0, 40, (4, 16))
    keep = torch.tensor([[True, True], [False, True], [True, False], [False, False]])

    def loss(idx, keep):
        return sum(m.exit_losses(idx, idx, keep).values())

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(idx, keep)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    assert_close(torch.compile(loss, backend="aot_eager", fullgraph=True)(idx, keep), loss(idx, keep))
    assert not torch.allclose(loss(idx, keep), loss(idx, torch.ones_like(keep)))  # the mask changes the loss
