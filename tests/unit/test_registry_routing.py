"""The registry's per-batch routing computes what each row's version computes, whatever batch came before:
the base (adapter off, and v0, whose LoRA is zero), one version, and batches mixing them, in any order (the
layers are switched off and on only when that changes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from service.engine.registry import AdapterRegistry, with_empty_adapter
from tests.support.adapters import VersionWriter
from thumbtune.core.contract import ADAPTER_WEIGHTS
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

pytestmark = pytest.mark.usefixtures("single_thread")


def test_rows_get_their_versions_logits_in_any_order_of_batches(tiny_model_dir: Path, tmp_path: Path) -> None:
    store = LocalAdapterStore(tmp_path / "adapters")
    version = VersionWriter(tiny_model_dir).write(store, 0.5, seed=1)
    directory = store.directory(version)
    model = with_empty_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), Settings())
    registry = AdapterRegistry(model)
    with torch.no_grad():
        registry.load(version, directory, load_file(str(directory / ADAPTER_WEIGHTS)))
    registry.publish(version)
    ids = torch.tensor([[1, 450, 1200, 33, 7]])
    with torch.no_grad():
        reference = {"base": AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits[0]}
        fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        reference[version] = PeftModel.from_pretrained(fresh, str(directory))(input_ids=ids).logits[0]
    reference["v0"] = reference["base"]
    assert not torch.allclose(reference["base"], reference[version], atol=1e-3)  # the version moves the model

    for names in (["base"], [version], ["base", version], ["v0"], [version, "v0"], ["v0", "base"], [version]):
        with torch.no_grad(), registry.routing(names) as extra:
            logits = model(input_ids=ids.repeat(len(names), 1), **extra).logits
        for row, name in enumerate(names):
            torch.testing.assert_close(
                logits[row], reference[name], atol=1e-5, rtol=1e-5, msg=f"{names}[{row}]"
            )
    with model.disable_adapter(), torch.no_grad():  # peft's own context manager agrees with the registry
        torch.testing.assert_close(model(input_ids=ids).logits[0], reference["base"], atol=1e-5, rtol=1e-5)
    with torch.no_grad(), registry.routing([version]) as extra:
        torch.testing.assert_close(
            model(input_ids=ids, **extra).logits[0], reference[version], atol=1e-5, rtol=1e-5
        )


def test_batches_on_the_base_skip_the_lora_layers_and_a_version_loaded_meanwhile_still_applies(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch on the base (or v0) runs the wrapped modules' own forward: peft's LoRA forward, whose per-call
    bookkeeping costs ~0.7 ms a decode step on the embedded model, is not called at all. Switching back on,
    also after a version was loaded while off, runs it again."""
    from peft.tuners.lora import layer as lora_layer

    calls = []
    peft_forward = lora_layer.Linear.forward

    def counting(self, x, *args, **kwargs):  # noqa: ANN001, ANN202 - peft's signature
        calls.append(1)
        return peft_forward(self, x, *args, **kwargs)

    monkeypatch.setattr(lora_layer.Linear, "forward", counting)
    store = LocalAdapterStore(tmp_path / "adapters")
    writer = VersionWriter(tiny_model_dir)
    first = writer.write(store, 0.5, seed=1)
    model = with_empty_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), Settings())
    registry = AdapterRegistry(model)
    ids = torch.tensor([[1, 450, 1200, 33, 7]])

    def run(names: list[str]) -> torch.Tensor:
        calls.clear()
        with torch.no_grad(), registry.routing(names) as extra:
            return model(input_ids=ids.repeat(len(names), 1), **extra).logits

    base = run(["v0"])
    assert calls == []
    with torch.no_grad():
        directory = store.directory(first)
        registry.load(first, directory, load_file(str(directory / ADAPTER_WEIGHTS)))
    registry.publish(first)
    torch.testing.assert_close(run(["base"]), base)
    assert calls == []
    assert not torch.allclose(run([first]), base, atol=1e-3)
    assert calls  # peft's forward again, with the version's LoRA
