"""training.attention: which kernel each diffusers attention layer runs."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from difftrain.config import TrainingConfig
from difftrain.models.unet import build_unet
from difftrain.training.attention import CPU_BF16_CLASSIC_MAX_TOKENS, AutoAttention
from difftrain.training.optim import apply_speed_options


def _outputs(tokens: int, bf16: bool, spatial: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    layer = Attention(32, heads=4, dim_head=8, residual_connection=spatial, norm_num_groups=8 if spatial else None)
    side = int(tokens ** 0.5)
    x = torch.randn(2, 32, side, side) if spatial else torch.randn(2, tokens, 32)
    outputs = {}
    for name, processor in (("auto", AutoAttention()), ("classic", AttnProcessor()), ("sdpa", AttnProcessor2_0())):
        layer.set_processor(processor)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs[name] = layer(x)
    return outputs


@pytest.mark.parametrize("spatial", [False, True])
def test_auto_runs_the_classic_kernel_for_short_sequences_under_cpu_bf16_and_sdpa_otherwise(spatial, monkeypatch):
    # As on a CPU with AVX512-BF16, whatever this one has.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    short = _outputs(64, bf16=True, spatial=spatial)
    # The two kernels round differently in bf16, so a bitwise match says which one ran.
    assert not torch.equal(short["classic"], short["sdpa"])
    assert torch.equal(short["auto"], short["classic"])
    longer = _outputs(1024, bf16=True, spatial=spatial)  # past CPU_BF16_CLASSIC_MAX_TOKENS: SDPA is faster there
    assert 1024 > CPU_BF16_CLASSIC_MAX_TOKENS and torch.equal(longer["auto"], longer["sdpa"])
    fp32 = _outputs(64, bf16=False, spatial=spatial)
    assert torch.equal(fp32["auto"], fp32["sdpa"])
    # Where the CPU only emulates bf16 (AVX2) SDPA is the faster kernel at every length.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    emulated = _outputs(64, bf16=True, spatial=spatial)
    assert torch.equal(emulated["auto"], emulated["sdpa"])


def test_training_attention_reaches_every_attention_layer_of_a_pixel_unet():
    # UNet2DModel has no set_attn_processor: the setting used to pass it by.
    unet = build_unet("small", None, 3, 32)
    expected = {"auto": AutoAttention, "sdpa": AttnProcessor2_0, "default": AttnProcessor}
    for choice, kind in expected.items():
        apply_speed_options({"unet": unet}, TrainingConfig(attention=choice))
        processors = [layer.processor for layer in unet.modules() if isinstance(layer, Attention)]
        assert len(processors) == 4 and all(type(p) is kind for p in processors), choice
    assert TrainingConfig().attention == "auto"


def test_a_unet_set_to_auto_attention_loads_in_diffusers_with_its_stock_kernel_and_draws_the_same(
        tmp_path, monkeypatch):
    # The kernel is a training-time choice: it is not saved, and the saved model loads with diffusers' own.
    from diffusers import UNet2DModel

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # where auto picks the classic kernel

    unet = build_unet("small", None, 3, 32)
    apply_speed_options({"unet": unet}, TrainingConfig())
    unet.save_pretrained(tmp_path)
    loaded = UNet2DModel.from_pretrained(tmp_path)
    assert {type(layer.processor) for layer in loaded.modules() if isinstance(layer, Attention)} == {AttnProcessor2_0}
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.allclose(loaded(x, t).sample, unet(x, t).sample, atol=1e-5)  # fp32: both SDPA
        # Under CPU bf16 the training copy runs the classic kernel and the loaded one SDPA: the
        # same prediction, up to bf16 rounding.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            trained, stock = unet(x, t).sample.float(), loaded(x, t).sample.float()
    assert not torch.equal(trained, stock)
    assert (trained - stock).abs().max() < 0.05 * stock.abs().max()


def test_auto_attention_traces_into_one_graph_for_torch_compile():
    """The CPU probe is asked when the processor is made: inside the call, torch.compile could not trace
    it and broke the graph at every attention layer, so a compiled SD UNet ran largely eager. The real probe,
    not a stand-in: a Python stand-in is traceable, torch.cpu's own is not."""
    layer = Attention(32, heads=4, dim_head=8)
    processor = AutoAttention()
    processor.cpu_has_bf16 = True  # the classic-kernel path a bf16 CPU takes, traced on any CPU
    layer.set_processor(processor)

    def forward(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(forward)(torch.randn(2, 64, 32))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
