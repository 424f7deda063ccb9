"""The torch backend's speed switches (generate/speed.py) change how fast an image comes, not which
image: fused QKV projections, torch.compile of the UNet and VAE decoder with a kernel cache kept
across runs, and the fp16 VAE's fall-back to fp32 when it overflows."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.cli import main
from difftrain.generate.text2image import Drawer, GenerateOptions
from test_text2image import tiny_sd  # noqa: F401  (the fixture)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_fused_qkv_draws_the_same_images_with_one_projection_per_attention(tiny_sd):  # noqa: F811
    from diffusers.models.attention_processor import Attention

    from difftrain.generate.speed import fuse_qkv

    plain = Drawer(str(tiny_sd), GenerateOptions(prompt="x", steps=4), progress=False)
    fused = Drawer(str(tiny_sd), GenerateOptions(prompt="x", steps=4, fuse_qkv=True), progress=False)
    attentions = [m for m in fused.pipe.unet.modules() if isinstance(m, Attention)]
    assert attentions and all(type(a.processor).__name__ == "FusedAttnProcessor2_0" for a in attentions)
    # Self-attention projects q, k and v in one matmul; cross-attention k and v (q reads other inputs).
    assert all(hasattr(a, "to_kv" if a.is_cross_attention else "to_qkv") for a in attentions)
    assert any(hasattr(m, "to_qkv") for m in fused.pipe.vae.modules())  # the VAE's mid-block attention too
    assert not any(hasattr(m, "to_qkv") for m in plain.pipe.unet.modules())  # off by default on a CPU
    one, two = (np.stack([np.asarray(im, dtype=np.int16) for im in d.draw("a red circle", "", [0, 1])])
                for d in (plain, fused))
    assert np.abs(one - two).max() <= 1
    # On CUDA it is the default, except where the separate projections matter.
    cuda = torch.device("cuda")
    assert fuse_qkv(SimpleNamespace(unet=SimpleNamespace(peft_config={"lora0": None})), None, cuda, False) is False
    assert fuse_qkv(SimpleNamespace(unet=SimpleNamespace()), None, cuda, attention_slicing=True) is False


def test_an_fp16_vae_that_overflows_decodes_again_in_fp32(tiny_sd, tmp_path, capsys):  # noqa: F811
    from diffusers import AutoencoderKL

    model = tmp_path / "hot-vae"
    shutil.copytree(tiny_sd, model)
    vae = AutoencoderKL.from_pretrained(model / "vae")
    with torch.no_grad():  # activations past fp16's 65504 right after the first conv; GroupNorm scales them back
        vae.decoder.conv_in.weight *= 1e5
        vae.decoder.conv_in.bias *= 1e5
    vae.save_pretrained(model / "vae")
    latents = torch.randn(1, 4, 16, 16) / vae.config.scaling_factor
    with torch.no_grad():
        assert torch.isfinite(vae.decode(latents).sample).all()
        assert not torch.isfinite(vae.half().decode(latents.half()).sample).all()  # what fp16 alone would give

    args = ["generate", str(model), "--prompt", "a red circle", "--steps", "4", "--no-progress"]
    assert main([*args, "--precision", "fp16", "--out", str(tmp_path / "fp16")]) == 0
    assert "the VAE overflowed in fp16 (NaN or inf pixels): it decodes in fp32" in capsys.readouterr().err
    assert main([*args, "--precision", "fp32", "--out", str(tmp_path / "fp32")]) == 0
    half, full = pixels(tmp_path / "fp16/00000-0.png"), pixels(tmp_path / "fp32/00000-0.png")
    assert half.std() > 10 and np.abs(half - full).mean() < 1  # not the black of NaN pixels: fp32's image
    # Only the decoder moved: the next img2img of the same pipeline still encodes its fp16 image.
    assert main([*args, "--precision", "fp16", "--init-image", str(tmp_path / "fp32/00000-0.png"), "--n-iter", "2",
                 "--out", str(tmp_path / "img2img")]) == 0
    assert len(list((tmp_path / "img2img").glob("*.png"))) == 2


def test_compiled_unet_and_vae_draw_the_plain_images_and_a_later_run_compiles_from_the_cache(
        difftrain_cache, tmp_path, monkeypatch, capsys):
    """A model of one level each: inductor's cold compile of both graphs is ~30 s on 2 cores (the test
    session's cache outlives it, as difftrain's does, so that is paid once on a machine)."""
    from torch._dynamo.utils import counters

    from difftrain.models.tiny_sd import write_tiny_sd

    def forget_compiled_code():
        torch._dynamo.reset()
        counters.clear()

    model = write_tiny_sd(tmp_path / "one-level", unet_channels=(16,), vae_channels=(16,), sample_size=8)
    kernels = difftrain_cache / "torch-compile"
    # The report counts this process's compiles, as a `difftrain generate` process has only its own;
    # a test worker may have compiled something else before.
    forget_compiled_code()
    monkeypatch.setattr("difftrain.cache._INDUCTOR_DIR_GIVEN", None)  # as where TORCHINDUCTOR_CACHE_DIR is unset
    args = ["generate", str(model), "--prompt", "a red circle", "--steps", "4", "--batch-size", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "eager")]) == 0
    assert main([*args, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    assert f"of 2 graph(s) from the kernel cache in {kernels}" in capsys.readouterr().out
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(kernels)  # not the /tmp default diffusers' import wrote
    assert (kernels / "fxgraph").is_dir()
    for name in ("00000-0.png", "00001-1.png"):
        assert np.abs(pixels(tmp_path / "eager" / name) - pixels(tmp_path / "compiled" / name)).max() <= 1
    # A later run finds both graphs compiled on disk: dynamo forgets this process's compiled code, as a
    # new process would not have it (a subprocess run costs 8 s more of imports and shows the same).
    forget_compiled_code()
    assert main([*args, "--compile", "--out", str(tmp_path / "later")]) == 0
    assert "2 of 2 graph(s) from the kernel cache" in capsys.readouterr().out
    assert np.array_equal(pixels(tmp_path / "compiled/00000-0.png"), pixels(tmp_path / "later/00000-0.png"))


def test_switches_that_cannot_work_together_are_refused_before_loading(tiny_sd, tmp_path, capsys):  # noqa: F811
    cases = [(["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead applies to --compile"),
             (["--compile", "--cpu-offload"], "--compile with --cpu-offload"),
             (["--fuse-qkv", "--attention-slicing"], "sliced attention runs the unfused projections")]
    for flags, message in cases:
        assert main(["generate", str(tiny_sd), "--prompt", "x", "--steps", "2", *flags, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (flags, err)


def test_under_cuda_graphs_the_unet_output_is_copied_out_of_the_graph_pool(tiny_sd):  # noqa: F811
    """CUDA graphs replay into the same output buffer; the hook hands the pipeline a copy of its own."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    from difftrain.generate.speed import _own_output, compile_pipeline

    drawer = Drawer(str(tiny_sd), GenerateOptions(prompt="x", steps=2), progress=False)
    compile_pipeline(drawer.pipe, "reduce-overhead")  # compiles lazily: nothing runs here
    assert _own_output in drawer.pipe.unet._forward_hooks.values()
    pool = torch.ones(2, 4, 8, 8)
    copied = _own_output(None, (), (pool, "kept"))
    assert copied[1] == "kept" and torch.equal(copied[0], pool) and copied[0].data_ptr() != pool.data_ptr()
    as_output = _own_output(None, (), UNet2DConditionOutput(sample=pool))
    assert torch.equal(as_output[0], pool) and as_output[0].data_ptr() != pool.data_ptr()


@pytest.mark.parametrize("device, mode", [("cuda", "reduce-overhead"), ("cpu", "default")])
def test_compile_auto_takes_cuda_graphs_only_on_a_gpu(device, mode):
    from difftrain.generate.speed import resolve_compile_mode

    assert resolve_compile_mode("auto", torch.device(device)) == mode
    assert resolve_compile_mode("max-autotune", torch.device(device)) == "max-autotune"
