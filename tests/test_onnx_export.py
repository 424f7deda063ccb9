"""`difftrain export --to onnx` and `generate --backend onnxruntime` on the tiny SD the tests build."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_personalise import lora_run  # noqa: F401
from test_text2image import tiny_sd  # noqa: F401

from difftrain.cli import main
from difftrain.generate.infotext import parse_infotext, read_png_infotext

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def onnx_model(tiny_sd, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    assert main(["export", str(tiny_sd), str(out), "--no-progress"]) == 0
    return out


def generate(model: Path, out: Path, *extra: str) -> list[Path]:
    assert main(["generate", str(model), "--prompt", "a red circle", "--negative-prompt", "blue", "--steps", "5",
                 "--seed", "3", "--out", str(out), "--no-progress", *extra]) == 0
    return sorted(out.glob("*.png"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_the_export_has_diffusers_layout_dynamic_axes_and_a_manifest(onnx_model):
    import onnx

    for part in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert (onnx_model / part / "model.onnx").is_file() and (onnx_model / part / "config.json").is_file()
    assert (onnx_model / "tokenizer" / "tokenizer_config.json").is_file() and (onnx_model / "scheduler").is_dir()
    index = json.loads((onnx_model / "model_index.json").read_text())
    assert index["_class_name"] == "OnnxStableDiffusionPipeline" and index["unet"] == ["diffusers", "OnnxRuntimeModel"]
    manifest = json.loads((onnx_model / "difftrain.json").read_text())
    assert manifest["kind"] == "onnx" and manifest["export"]["opset"] == 17
    assert manifest["export"]["exporter"] == "torchscript" and manifest["export"]["precision"] == "fp32"
    unet = onnx.load(str(onnx_model / "unet" / "model.onnx"))
    onnx.checker.check_model(unet)
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in unet.graph.input}
    assert shapes["sample"] == ["batch", 4, "height", "width"], shapes
    assert shapes["encoder_hidden_states"][:2] == ["batch", "sequence"]
    assert not list(onnx_model.parent.glob(".*partial*"))  # written whole, then renamed


@pytest.mark.parametrize("extra", [(), ("--clip-skip", "2", "--batch-size", "2"), ("--width", "48", "--height", "64"),
                                   ("--scheduler", "Euler a"), ("--hires-scale", "1.5", "--hires-upscaler", "Lanczos")],
                         ids=["plain", "clip-skip-batch", "size", "euler-a", "hires"])
def test_onnxruntime_draws_what_torch_draws_with_the_same_infotext(onnx_model, tiny_sd, tmp_path, extra):  # noqa: F811
    torch_images = generate(tiny_sd, tmp_path / "torch", *extra)
    onnx_images = generate(onnx_model, tmp_path / "onnx", *extra)
    assert len(torch_images) == len(onnx_images) >= 1
    for a, b in zip(torch_images, onnx_images):
        assert pixels(a).shape == pixels(b).shape
        # fp32 graphs: the same image up to float rounding (1/255 at most on this model)
        assert np.abs(pixels(a) - pixels(b)).max() <= 2, (a, b)
        (pa, na, params_a), (pb, nb, params_b) = (parse_infotext(read_png_infotext(p)) for p in (a, b))
        assert (pa, na) == (pb, nb)
        assert {k: v for k, v in params_a.items() if k != "Model"} == {k: v for k, v in params_b.items() if k != "Model"}


def test_img2img_on_onnxruntime_matches_torch(onnx_model, tiny_sd, tmp_path):  # noqa: F811
    init = tmp_path / "init.png"
    Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")).save(init)
    extra = ("--init-image", str(init), "--strength", "0.6")
    a, b = generate(tiny_sd, tmp_path / "torch", *extra), generate(onnx_model, tmp_path / "onnx", *extra)
    assert np.abs(pixels(a[0]) - pixels(b[0])).max() <= 2
    # Inpainting too: the blend wraps the ONNX UNet's forward as it wraps torch's.
    mask = Image.new("L", (32, 32))
    mask.paste(255, (14, 8, 30, 24))
    mask.save(tmp_path / "mask.png")
    extra = (*extra, "--mask", str(tmp_path / "mask.png"), "--masked-content", "latent noise", "--mask-blur", "2")
    a, b = generate(tiny_sd, tmp_path / "torch-inpaint", *extra), generate(onnx_model, tmp_path / "onnx-inpaint", *extra)
    assert np.abs(pixels(a[0]) - pixels(b[0])).max() <= 2
    resized = Image.open(init).convert("RGB").resize(Image.open(a[0]).size, Image.Resampling.LANCZOS)
    assert np.array_equal(pixels(a[0])[:, :2], np.asarray(resized)[:, :2])  # far from the mask: the init's


def test_diffusers_own_onnx_pipeline_loads_the_export(onnx_model):
    from diffusers import OnnxStableDiffusionPipeline

    pipe = OnnxStableDiffusionPipeline.from_pretrained(onnx_model, provider="CPUExecutionProvider")
    # diffusers' ONNX pipeline assumes SD's 8x VAE; the tiny one's is 2x, so 128 "px" asks for a 16-cell latent
    image = pipe("a red circle", num_inference_steps=3, height=128, width=128,
                 generator=np.random.RandomState(0)).images[0]
    assert image.size == (32, 32) and np.isfinite(np.asarray(image, dtype=float)).all()


def test_a_lora_run_exports_merged_at_its_scale(lora_run, tiny_sd, tmp_path):  # noqa: F811
    merged, off = tmp_path / "merged", tmp_path / "off"
    # x20: a 4-step LoRA moves this model's images by a few levels only; scaled up, its effect is plain to see
    assert main(["export", str(lora_run), str(merged), "--lora-scale", "20", "--no-progress"]) == 0
    assert main(["export", str(lora_run), str(off), "--lora-scale", "0", "--no-progress"]) == 0
    lora_file = lora_run / "model" / "pytorch_lora_weights.safetensors"
    # The exports keep the run's training size (16 px) as their default; the base model's is 32 px.
    size = ("--width", "16", "--height", "16")
    with_lora = pixels(generate(tiny_sd, tmp_path / "run", "--lora", f"{lora_file}:20", *size)[0])
    assert np.abs(pixels(generate(merged, tmp_path / "m")[0]) - with_lora).max() <= 2
    base_image = pixels(generate(tiny_sd, tmp_path / "base", *size)[0])
    assert np.abs(pixels(generate(off, tmp_path / "o")[0]) - base_image).max() <= 2
    assert np.abs(with_lora - base_image).max() > 10  # the LoRA changes the image, so the two checks mean something
    assert json.loads((merged / "difftrain.json").read_text())["loras"] == []  # baked in, nothing to load on top
    # ... and the manifest names what was merged: the run's own LoRA (it listed only --lora's)
    assert json.loads((merged / "difftrain.json").read_text())["export"]["loras_merged"] == [[str(lora_file), 1.0]]


def test_export_settings_that_cannot_work_are_refused_before_the_export(tiny_sd, tmp_path, capsys):  # noqa: F811
    cases = [(["--opset", "30"], "--opset 30: torch's torchscript exporter writes opset 20 at most"),
             (["--quantize", "int8", "--gate-size", "100"], "--gate-size 100: a multiple of 8 px, at least 64"),
             (["--lora-scale", "0.5"], "--lora-scale 0.5: scales the LoRAs merged in, and ")]
    for flags, message in cases:
        assert main(["export", str(tiny_sd), str(tmp_path / "out"), *flags, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (flags, err)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def assert_attention_core_in_fp32(path: Path) -> None:
    """Weight MatMuls read int8 weights; attention's Q K^T, its softmax and the product with V take no
    dequantized input, so ONNX Runtime cannot fuse them into QLinearMatMul / QLinearSoftmax."""
    import onnx

    graph = onnx.load(str(path)).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    matmuls = [node for node in graph.node if node.op_type == "MatMul"]
    weight_int8 = [node for node in matmuls if made_by.get(node.input[1]) == "DequantizeLinear"]
    fp32_core = [node for node in matmuls if "DequantizeLinear" not in {made_by.get(name) for name in node.input}]
    softmax = [node for node in graph.node if node.op_type == "Softmax"]
    assert weight_int8 and fp32_core and softmax and len(weight_int8) + len(fp32_core) == len(matmuls)
    assert len(fp32_core) == 2 * len(softmax)  # Q K^T and (.) V around each softmax
    assert not [node for node in softmax if made_by.get(node.input[0]) == "DequantizeLinear"]


def test_int8_is_smaller_and_written_only_through_its_quality_gate(onnx_model, tiny_sd, tiny_clip, tmp_path,  # noqa: F811
                                                                   capsys):
    fp32, int8, strict = onnx_model, tmp_path / "int8", tmp_path / "strict"
    # 6 steps instead of 12 for time; the trained mini SD passes the default gate (test_controlnet_demo.py).
    clip = ["--gate-clip", str(tiny_clip)]
    assert main(["export", str(tiny_sd), str(int8), "--quantize", "int8", "--gate-steps", "6", *clip,
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    gate = json.loads((int8 / "difftrain.json").read_text())["export"]["quality_gate"]
    assert gate["passed"] and gate["images"] == 8 and gate["psnr_min"] >= gate["min_psnr"] == 22.0
    # With a CLIP the gate also holds the CLIP score of the same images against their prompts.
    assert "quality gate passed: PSNR to fp32" in out and f"CLIP score {gate['clip_score_int8']:.2f} against" in out
    assert gate["clip_model"] == str(tiny_clip) and gate["clip_passed"] and gate["max_clip_drop"] == 1.0
    assert 0 <= gate["clip_score_int8"] <= 100
    assert gate["clip_drop"] == pytest.approx(gate["clip_score_fp32"] - gate["clip_score_int8"], abs=2e-3)
    assert (int8 / "unet/model.onnx").stat().st_size < 0.5 * (fp32 / "unet/model.onnx").stat().st_size
    assert sorted(p.name for p in (int8 / "unet").iterdir()) == ["config.json", "model.onnx"]  # no staging left
    assert not any(p.is_symlink() for p in int8.iterdir()) and not list(tmp_path.glob(".*"))  # nor the fp32 links
    assert_attention_core_in_fp32(int8 / "unet/model.onnx")
    generate(int8, tmp_path / "images")  # and it draws
    quick = ["--gate-steps", "3"]  # the refusal and --force need no long gate
    # Both measures held out of reach (a CLIP drop below -100 points cannot be met): refused, naming both.
    assert main(["export", str(tiny_sd), str(strict), "--quantize", "int8", "--min-psnr", "200", *quick, *clip,
                 "--max-clip-drop", "-100", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "int8 fails the quality gate: PSNR to fp32" in err and "--force" in err, err
    assert "; CLIP score" in err and "raise --max-clip-drop" in err, err
    assert not strict.exists() and not list(tmp_path.glob(".strict*"))
    assert main(["export", str(tiny_sd), str(strict), "--quantize", "int8", "--min-psnr", "200", "--force", *quick,
                 "--no-progress"]) == 0
    assert json.loads((strict / "difftrain.json").read_text())["export"]["quality_gate"]["passed"] is False
    assert main(["export", str(tiny_sd), str(tmp_path / "plain"), *clip]) == 2  # the gate belongs to int8
    assert "add --quantize int8" in capsys.readouterr().err


def test_backends_and_providers_refuse_what_does_not_fit_with_the_fix(onnx_model, tiny_sd, tmp_path, capsys,  # noqa: F811
                                                                      monkeypatch):
    cases = [
        ([str(tiny_sd), "--backend", "onnxruntime"], f"difftrain export {tiny_sd} OUT --to onnx"),
        ([str(onnx_model), "--backend", "torch"], "it runs on --backend onnxruntime"),
        ([str(onnx_model), "--compile", "--fuse-qkv"], "--compile, --fuse-qkv: torch switches"),
        ([str(onnx_model), "--lora", str(tiny_sd / "x.safetensors")], "merge LoRAs and embeddings when exporting"),
        ([str(onnx_model), "--provider", "tensorrt"], "--provider-fallback"),
        ([str(tiny_sd), "--provider", "cuda"], "--provider: ONNX Runtime's; "),  # (ignored before)
        # a hires pass the graph cannot take is refused by its own flags, before the first pass draws
        ([str(onnx_model), "--width", "64", "--height", "64", "--hires-resize", "70x70"],
         "--hires-scale/--hires-resize: the hires pass would draw 70x70, and this ONNX export's UNet takes "
         "multiples of 4 px only"),
    ]
    for args, message in cases:
        assert main(["generate", *args, "--prompt", "x", "--steps", "2", "--out", str(tmp_path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    generate(onnx_model, tmp_path / "fallback", "--provider", "tensorrt", "--provider-fallback")  # runs on the CPU
    generate(onnx_model, tmp_path / "raw", "--no-ema")  # an export of a model no run trained has no EMA to refuse
    # onnxruntime-gpu lists CUDA even where its libraries fail to load, and then runs the session on the CPU:
    # listed here too, and this CPU build does the same.
    import onnxruntime

    listed = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *listed])
    assert main(["generate", str(onnx_model), "--provider", "cuda", "--prompt", "x", "--steps", "2", "--out",
                 str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lists CUDAExecutionProvider but could not start it" in err and "--provider-fallback" in err
    from difftrain.models.onnx import OnnxError, load_onnx_pipeline

    loaded = load_onnx_pipeline(onnx_model, "auto")
    assert loaded.onnx_providers == ["CPUExecutionProvider"]  # what runs, said
    assert "could not start CUDAExecutionProvider: running on CPUExecutionProvider" in capsys.readouterr().err
    # Traced at a latent its upsampler halves evenly, the graph has no path for an odd one, which torch's UNet
    # takes (SD at 520 px: a 65-latent side); refused by name, not by ONNX Runtime's shape error.
    with pytest.raises(OnnxError, match="latents whose sides are multiples of 2 only, and this one is 9x8"):
        loaded.unet(torch.zeros(1, 4, 8, 9), 1, torch.zeros(1, 77, 32))
    monkeypatch.undo()
    assert main(["export", str(tiny_sd), str(onnx_model), "--no-progress"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["export", str(onnx_model), str(tmp_path / "again"), "--no-progress"]) == 2
    assert "already an ONNX export; export again from the torch model" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as where it is not installed
    assert main(["export", str(tiny_sd), str(tmp_path / "none"), "--no-progress"]) == 2
    assert "pip install 'difftrain[onnx]'" in capsys.readouterr().err


def test_a_unet_exported_for_controlnets_takes_a_torch_controlnet_and_fp16_runs(tiny_sd, tmp_path):  # noqa: F811
    from difftrain.models.tiny_sd import write_tiny_controlnet

    net = write_tiny_controlnet(tiny_sd, tmp_path / "controlnet", zero_conv_std=0.5)
    control = tmp_path / "control.png"
    Image.fromarray((np.random.RandomState(1).rand(32, 32, 3) * 255).astype("uint8")).save(control)
    assert main(["export", str(tiny_sd), str(tmp_path / "cn-onnx"), "--controlnet", "--no-progress"]) == 0
    extra = ("--controlnet", str(net), "--control-image", str(control))
    steered = pixels(generate(tiny_sd, tmp_path / "torch", *extra)[0])
    # The ControlNet runs in torch and hands its residuals to the ONNX UNet.
    assert np.abs(pixels(generate(tmp_path / "cn-onnx", tmp_path / "onnx", *extra)[0]) - steered).max() <= 2
    plain = pixels(generate(tiny_sd, tmp_path / "plain")[0])
    assert np.abs(steered - plain).max() > 10  # the ControlNet really steers
    # Without a ControlNet, such a UNet gets zero residuals and draws the plain image.
    assert np.abs(pixels(generate(tmp_path / "cn-onnx", tmp_path / "no-net")[0]) - plain).max() <= 2
    # A UNet exported without those inputs says how to get them.
    from difftrain.generate.controlnet import ControlUnit
    from difftrain.generate.text2image import Drawer, GenerateOptions
    from difftrain.models.onnx import OnnxError

    plain_export = tmp_path / "plain-onnx"
    assert main(["export", str(tiny_sd), str(plain_export), "--no-progress"]) == 0
    options = GenerateOptions(prompt="", steps=2, controlnets=[ControlUnit(model=str(net), image=str(control))])
    drawer = Drawer(plain_export, options, progress=False)
    with pytest.raises(OnnxError, match="exported without ControlNet inputs; export it again with --controlnet"):
        drawer.draw("x", "", [0])

    import onnx

    assert main(["export", str(tiny_sd), str(tmp_path / "fp16"), "--precision", "fp16", "--no-progress"]) == 0
    unet = onnx.load(str(tmp_path / "fp16" / "unet" / "model.onnx"))
    assert {i.data_type for i in unet.graph.initializer if len(i.dims) > 1} == {onnx.TensorProto.FLOAT16}
    for part in ("unet", "text_encoder", "vae_encoder", "vae_decoder"):
        onnx.checker.check_model(onnx.load(str(tmp_path / "fp16" / part / "model.onnx")))  # topologically sorted
    # The timestep's sinusoidal embedding is computed in fp32: 0.14 off near t = 1,000 when it was fp16.
    assert time_embedding_error(unet, tiny_sd / "unet") < 1e-3
    assert np.abs(pixels(generate(tmp_path / "fp16", tmp_path / "half")[0]) - plain).max() <= 4


def time_embedding_error(unet, config_dir: Path, residual_shapes: dict | None = None) -> float:
    """Largest difference between what an exported UNet feeds its time embedding and diffusers' fp64 value.

    `residual_shapes`: those of a UNet exported for ControlNets (name -> channels, times smaller), fed zeros.
    """
    import onnx
    import onnxruntime
    from diffusers.models.embeddings import get_timestep_embedding

    config = json.loads((config_dir / "config.json").read_text())
    reached = {"timestep"}  # the first layer with weights the timestep reaches: the time embedding's linear_1
    for node in unet.graph.node:
        if reached.intersection(node.input):
            if node.op_type in ("Gemm", "MatMul"):
                linear_1 = node
                break
            reached.update(node.output)
    unet.graph.output.append(onnx.helper.make_tensor_value_info(linear_1.input[0], onnx.TensorProto.FLOAT16, None))
    session = onnxruntime.InferenceSession(unet.SerializeToString(), providers=["CPUExecutionProvider"])
    timesteps = np.array([999.0, 923.47, 1.0], np.float32)  # Karras and Euler schedules give fractional ones
    residuals = {name: np.zeros((3, channels, 8 // down, 8 // down), np.float32)
                 for name, (channels, down) in (residual_shapes or {}).items()}
    fed = session.run([linear_1.input[0]], {
        "sample": np.zeros((3, 4, 8, 8), np.float32), "timestep": timesteps,
        "encoder_hidden_states": np.zeros((3, 77, config["cross_attention_dim"]), np.float32), **residuals})[0]
    exact = get_timestep_embedding(torch.from_numpy(timesteps).double(), fed.shape[1], flip_sin_to_cos=True,
                                   downscale_freq_shift=config["freq_shift"])
    return float(np.abs(fed.astype(np.float64) - exact.numpy()).max())


def test_the_dynamo_exporters_fp16_unet_keeps_only_the_timestep_path_in_fp32(tiny_sd, tmp_path, capsys):  # noqa: F811
    import onnx

    from difftrain.models.tiny_sd import write_tiny_controlnet

    assert main(["export", str(tiny_sd), str(tmp_path / "17"), "--exporter", "dynamo", "--opset", "17"]) == 2
    assert "give --opset 18 or more, or leave --opset out" in capsys.readouterr().err
    # With ControlNet inputs too (named *residuals once failed the dynamo exporter's dynamic axes)
    assert main(["export", str(tiny_sd), str(tmp_path / "fp16"), "--exporter", "dynamo", "--precision", "fp16",
                 "--controlnet", "--no-progress"]) == 0
    unet = onnx.load(str(tmp_path / "fp16" / "unet" / "model.onnx"))
    # Its node names carry no module path: the path is found by structure, not the whole UNet left in fp32.
    weights = {i.name: i.data_type for i in unet.graph.initializer if len(i.dims) > 1}
    assert [name for name, kind in weights.items() if kind == onnx.TensorProto.FLOAT] == ["unsqueeze_1"]  # frequencies
    residual_shapes = json.loads((tmp_path / "fp16" / "unet" / "config.json").read_text())["_residual_shapes"]
    assert time_embedding_error(unet, tiny_sd / "unet", residual_shapes) < 1e-3
    for part in ("unet", "text_encoder", "vae_encoder", "vae_decoder"):
        onnx.checker.check_model(onnx.load(str(tmp_path / "fp16" / part / "model.onnx")))
    plain = pixels(generate(tiny_sd, tmp_path / "plain")[0])
    assert np.abs(pixels(generate(tmp_path / "fp16", tmp_path / "half")[0]) - plain).max() <= 4
    net = write_tiny_controlnet(tiny_sd, tmp_path / "controlnet", zero_conv_std=0.5)
    control = tmp_path / "control.png"
    Image.fromarray((np.random.RandomState(1).rand(32, 32, 3) * 255).astype("uint8")).save(control)
    extra = ("--controlnet", str(net), "--control-image", str(control))
    steered = pixels(generate(tiny_sd, tmp_path / "torch", *extra)[0])
    assert np.abs(pixels(generate(tmp_path / "fp16", tmp_path / "cn-half", *extra)[0]) - steered).max() <= 4
    assert np.abs(steered - plain).max() > 10


def test_serve_draws_from_an_onnx_export_what_generate_draws(onnx_model, tiny_sd, tmp_path):  # noqa: F811
    import webuiapi

    from difftrain.serve.app import BackgroundServer, ServeSettings

    (tmp_path / "loras").mkdir()
    running = BackgroundServer(ServeSettings(models=[str(onnx_model)], lora_dir=str(tmp_path / "loras")))
    try:
        host, port = running.url.rsplit(":", 1)
        api = webuiapi.WebUIApi(host=host.split("//")[1], port=int(port), sampler="DPM++ 2M", steps=5)
        served = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=3, width=64, height=64,
                             cfg_scale=7.0, alwayson_scripts={}).image
        # A1111 reads "DPM++ 2M" with the Automatic schedule as Karras, and so does serve
        [path] = generate(onnx_model, tmp_path / "direct", "--scheduler", "DPM++ 2M Karras", "--width", "64",
                          "--height", "64")
        assert np.array_equal(np.asarray(served.convert("RGB"), dtype=np.int16), pixels(path))
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, tmp_path / "loras" / "style.safetensors")
        with pytest.raises(RuntimeError, match="is an ONNX export: its weights are fixed"):
            api.txt2img(prompt="a cat <lora:style:1>", width=64, height=64, alwayson_scripts={})
    finally:
        running.stop()


def test_fp16_conversion_of_a_graph_with_external_weights_leaves_no_fp32_file(tmp_path, monkeypatch):
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    from difftrain.export import onnx as export_onnx

    weight = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)  # 256 KB in fp32
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])], [numpy_helper.from_array(weight, "w")])
    path = tmp_path / "model.onnx"
    # As SD 1.5's UNet: past the limit in fp32 (3.4 GB), under it in fp16 (1.7 GB).
    monkeypatch.setattr(export_onnx, "EXTERNAL_FROM", 200_000)
    export_onnx._save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert (tmp_path / "model.onnx_data").stat().st_size == weight.nbytes
    export_onnx._to_fp16(path)
    assert not (tmp_path / "model.onnx_data").exists()
    assert onnx.load(str(path)).graph.initializer[0].data_type == TensorProto.FLOAT16
    x = np.ones((1, 256), np.float32)
    y = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(y - x @ weight).max() < 0.05 * np.abs(x @ weight).max()


def test_the_int8_gates_clip_score_is_evals_of_the_prompts_without_a1111s_syntax(tiny_clip, monkeypatch):
    """The gate scored "(detailed:1.2)" with its brackets and weight; eval scores the plain text."""
    from difftrain.evaluate.clip_score import ClipScorer
    from difftrain.evaluate.scores import plain_text
    from difftrain.export.quality import PROMPTS, SEEDS, clip_gate

    scored, score = [], ClipScorer.score
    monkeypatch.setattr(ClipScorer, "score", lambda self, images, texts: scored.append(texts) or score(
        self, images, texts))
    images = [Image.new("RGB", (32, 32), (40 * i % 255, 90, 200 - 20 * i)) for i in range(len(PROMPTS) * len(SEEDS))]
    clip_gate(str(tiny_clip), images, images, None)
    plain = [plain_text(prompt) for prompt in PROMPTS for _ in SEEDS]
    assert scored == [plain, plain] and any(plain_text(prompt) != prompt for prompt in PROMPTS)
