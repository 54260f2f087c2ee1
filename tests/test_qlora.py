"""Adapters on a bitsandbytes nf4 base (QLoRA) on the CPU: every method against the same method on the
dequantized fp32 weight, diagnostics, a fit whose loss falls, the merge refusal, merged and peft exports.

Tolerance of the equivalence tests: both models multiply by the very same dequantized weight in fp32
(bitsandbytes' CPU path dequantizes the nf4 blocks, then runs an fp32 matmul), so they differ only by the
order of fp32 sums: a few ulp of the logits (observed <= 6e-8 absolute on logits of size ~0.5, <= 2e-7
relative on gradients). RTOL 1e-5 / ATOL 1e-6 leaves margin for that and would still catch any use of
the packed uint8 weight, a missing dequantization, or a different W0 (errors of order 1e-2 and more).
"""

from __future__ import annotations

import json
import sys

import lightning as L
import pytest
import torch

pytest.importorskip("bitsandbytes")

from lightning_peft import AdapterCallback
from lightning_peft.adapters.quantized import (
    QuantizationError,
    bnb_config,
    dequantized_weight,
    is_quantized,
    require_bitsandbytes,
)
from lightning_peft.core.inject import find_adapters, inject_adapters, merge_adapters
from lightning_peft.diagnostics.snapshot import measure_adapters
from lightning_peft.interop.export import export_merged, export_peft

RTOL, ATOL = 1e-5, 1e-6
METHODS = {"lora": {"r": 4}, "dora": {"r": 4}, "mora": {"r": 4}, "hira": {"r": 4}}
VOCAB = 64


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("qbase")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(folder, quantization: str | None = "nf4"):
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if quantization:
        kwargs = {"quantization_config": bnb_config(quantization, torch.float32), "device_map": {"": "cpu"}}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).train()


def dequantized_reference(folder, quantized):
    """The fp32 model whose quantized linears hold the nf4 model's dequantized weights."""
    model = load(folder, None)
    modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in model.named_modules():
            if is_quantized(modules.get(name)):
                module.weight.copy_(dequantized_weight(modules[name]))
    return model


def policy(method: str) -> dict:
    return {"rules": [{"name": method, "method": method, "modules": ["*_proj"], "hparams": METHODS[method]}]}


def adapted_pair(folder, method: str, quantization: str = "nf4"):
    """A quantized model and its dequantized fp32 reference, with the same non-zero adapter tensors."""
    quantized = load(folder, quantization)
    reference = dequantized_reference(folder, quantized)
    inject_adapters(quantized, policy(method))
    inject_adapters(reference, policy(method))
    with torch.no_grad():
        for (_, q), (_, r) in zip(find_adapters(quantized), find_adapters(reference), strict=True):
            for p in q.adapter.parameters():
                p.normal_(0, 0.1)
            r.adapter.load_state_dict(q.adapter.state_dict())
    return quantized, reference


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_on_nf4_matches_the_dequantized_fp32_base(base_folder, method):
    quantized, reference = adapted_pair(base_folder, method)
    assert all(is_quantized(layer.base) for _, layer in find_adapters(quantized))
    x = tokens()
    results = []
    for model in (quantized, reference):
        out = model(x, labels=x)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if ".adapter." in n}
        results.append((out.logits.detach(), grads))
    (q_logits, q_grads), (r_logits, r_grads) = results
    torch.testing.assert_close(q_logits, r_logits, rtol=RTOL, atol=ATOL)
    assert q_grads.keys() == r_grads.keys() and all(g is not None and g.abs().sum() > 0 for g in q_grads.values())
    for name in q_grads:
        torch.testing.assert_close(q_grads[name], r_grads[name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("method", ["dora", "hira"])
def test_fp4_base_matches_the_dequantized_fp32_base(base_folder, method):
    quantized, reference = adapted_pair(base_folder, method, "fp4")
    x = tokens()
    torch.testing.assert_close(quantized(x).logits, reference(x).logits, rtol=RTOL, atol=ATOL)


def test_int8_base_reads_w0_as_rows_times_their_scale(base_folder):
    """LLM.int8 also quantizes the activations, so outputs are not compared; W0 and training are."""
    quantized, _ = adapted_pair(base_folder, "dora", "int8")
    x = tokens()
    quantized(x, labels=x).loss.backward()  # after a forward, the row scales live in the layer's state
    for _, layer in find_adapters(quantized):
        weight = layer.base.weight
        scale = weight.SCB if getattr(weight, "SCB", None) is not None else layer.base.state.SCB
        torch.testing.assert_close(layer.base_weight(), weight.data.float() * scale[:, None] / 127)
        assert torch.isfinite(layer.adapter.lora_A.grad).all() and layer.adapter.lora_A.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["dora", "hira"])
def test_diagnostics_measure_against_the_dequantized_base(base_folder, method):
    quantized, reference = adapted_pair(base_folder, method)
    for q_row, r_row in zip(measure_adapters(quantized), measure_adapters(reference), strict=True):
        assert q_row["module"] == r_row["module"]
        for key in ("rel_norm", "effective_rank", "dir_drift"):
            assert q_row[key] == pytest.approx(r_row[key], rel=1e-4), (q_row["module"], key)


def test_in_place_merge_is_refused_naming_the_module(base_folder):
    quantized, _ = adapted_pair(base_folder, "lora")
    x = tokens()
    before = quantized(x).logits.detach()
    with pytest.raises(QuantizationError, match=r"model\.layers\.0\.self_attn\.q_proj.*nf4"):
        merge_adapters(quantized)
    assert not any(layer.merged for _, layer in find_adapters(quantized))
    torch.testing.assert_close(quantized(x).logits, before, rtol=0, atol=0)


def test_merged_export_dequantizes_and_loads_as_a_plain_model(base_folder, tmp_path):
    quantized, _ = adapted_pair(base_folder, "dora")
    x = tokens()
    expected = quantized(x).logits.detach()
    export_merged(quantized, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = load(tmp_path / "merged", None)
    assert not any(is_quantized(m) for m in merged.modules())
    torch.testing.assert_close(merged(x).logits, expected, rtol=1e-4, atol=1e-5)  # merged: a different fp32 sum order
    assert all(is_quantized(layer.base) for _, layer in find_adapters(quantized))  # the trained model is unchanged


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_export_loads_onto_the_same_quantized_base_with_equal_outputs(base_folder, tmp_path, method):
    from peft import PeftModel

    quantized, _ = adapted_pair(base_folder, method)
    x = tokens()
    expected = quantized(x).logits.detach()
    export_peft(quantized, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(load(base_folder), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, expected, rtol=RTOL, atol=ATOL)


def test_a_short_qlora_fit_lowers_the_loss(base_folder):
    from torch.utils.data import DataLoader

    from lightning_peft.tasks import CausalLM

    x = tokens(1).repeat(4, 1)
    loader = DataLoader([{"input_ids": row, "labels": row} for row in x], batch_size=8)
    model = CausalLM(pretrained_path=str(base_folder), quantization="nf4", lr=0.01)
    assert any(is_quantized(m) for m in model.modules())
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    callback = AdapterCallback(policy=policy("lora"))
    trainer = L.Trainer(
        max_steps=15,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[callback, Record()],
    )
    trainer.fit(model, train_dataloaders=loader)
    assert losses[-1] < 0.8 * losses[0], losses


def test_missing_bitsandbytes_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(QuantizationError) as err:
        require_bitsandbytes("nf4")
    assert str(err.value) == "quantization='nf4' needs bitsandbytes: pip install -e \".[quant]\""
