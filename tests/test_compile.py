"""`torch.compile` over a model carrying every adapter method: no graph breaks, training equals eager.

The AOT-eager backend traces forward and backward exactly as inductor does (Dynamo, then
AOTAutograd, custom autograd functions included) but runs the traced graphs without
generating C++, so it fits CI; inductor itself is measured in benchmarks/README.md.
"""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_peft import LayerPolicy, adapter_state_dict, inject_adapters
from lightning_peft.adapters import ADAPTERS

pytestmark = pytest.mark.slow

# One block per method (and per MoRA operator family), so one compiled graph covers them all.
METHODS = [
    ("lora", {"r": 4}),
    ("dora", {"r": 4}),
    ("mora", {"r": 4, "mora_type": "sharing"}),
    ("mora", {"r": 4, "mora_type": "rope"}),
    ("hira", {"r": 4}),
]


def every_method_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=len(METHODS),
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    rules = [
        {"method": m, "modules": ["*"], "depth": {"indices": [i]}, "hparams": hp} for i, (m, hp) in enumerate(METHODS)
    ]
    inject_adapters(model, LayerPolicy.load({"rules": rules}))
    return model


def test_every_registered_method_is_covered():
    assert {m for m, _ in METHODS} == set(ADAPTERS)


def test_no_graph_breaks():
    model = every_method_model()
    x = torch.randint(0, 32, (2, 8))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x: model(input_ids=x, labels=x).loss)(x)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]


def train(model: torch.nn.Module, forward, steps: int = 3) -> list[float]:
    data = torch.randint(0, 32, (steps, 2, 8), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for x in data:
        loss = forward(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_compiled_training_equals_eager():
    eager = every_method_model()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    eager_losses = train(eager, eager)
    compiled_losses = train(compiled, torch.compile(compiled, backend="aot_eager"))
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-6)
    assert len(set(eager_losses)) > 1  # it trained
    a, b = adapter_state_dict(eager), adapter_state_dict(compiled)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)
