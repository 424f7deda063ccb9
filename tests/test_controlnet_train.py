"""method: controlnet on the tiny Stable Diffusion, end to end through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_text2image import assert_same_tensors, losses, sd_config, tiny_sd, train_straight_and_interrupted  # noqa: F401

from difftrain.cli import main


@pytest.fixture(scope="session")
def mask_shapes(tmp_path_factory) -> Path:
    from difftrain.data.shapes import write_shapes_dataset

    return write_shapes_dataset(tmp_path_factory.mktemp("mask-shapes"), num_images=24, size=16, seed=0, masks=True)


def cn_config(tmp_path, data_dir, tiny_sd, name="run", controlnet=None, **sections):  # noqa: F811
    control = {"preprocess": "mask", "validation": [
        {"image": str(data_dir / "conditioning" / "000000.png"), "prompt": "a red circle"},
        {"image": str(data_dir / "conditioning" / "000005.png"), "prompt": "a green square"}]}
    control.update(controlnet or {})
    return sd_config(tmp_path, data_dir, tiny_sd, name, method="controlnet", controlnet=control, **sections)


def test_controlnet_run_writes_a_controlnet_diffusers_and_generate_load(tiny_sd, mask_shapes, tmp_path, capsys):  # noqa: F811
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    config = cn_config(tmp_path, mask_shapes, tiny_sd, controlnet={"proportion_empty_prompts": 0.2},
                       sample={"every_steps": 3})
    assert main(["train", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    assert "controlnet run finished at step 3/3" in out and "samples at step 3: control_mask_iou" in out
    scores = [json.loads(line) for line in (run / "samples" / "scores.jsonl").read_text().splitlines()]
    assert scores[-1]["step"] == 3 and 0.0 <= scores[-1]["control_mask_iou"] <= 1.0
    assert Image.open(run / "samples" / "step-00000003.png").size[0] >= 32  # the two validation pairs

    manifest = json.loads((run / "model" / "difftrain.json").read_text())
    assert manifest["kind"] == "controlnet" and manifest["base"]["model"] == str(tiny_sd.resolve())
    assert manifest["controls"] == [{"folder": ".", "scale": 1.0, "preprocess": "mask"}]
    net = ControlNetModel.from_pretrained(run / "model")
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=net)
    mask = Image.open(mask_shapes / "conditioning" / "000000.png")
    image = pipe("a red circle", image=mask, num_inference_steps=2, height=16, width=16,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (16, 16)
    # Only the ControlNet trained: it no longer equals a fresh copy of the UNet's encoder ...
    fresh = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32))
    assert not torch.equal(net.controlnet_mid_block.weight, fresh.controlnet_mid_block.weight)
    assert torch.equal(fresh.controlnet_mid_block.weight, torch.zeros_like(fresh.controlnet_mid_block.weight))
    # ... and the checkpoint holds it alone.
    assert {key.split(".")[0] for key in load_file(run / "checkpoints" / "step-00000003" / "model.safetensors")} \
        == {"controlnet"}

    # `generate` on the run: the first --control-image is for its ControlNet, preprocessed as trained.
    drawn = tmp_path / "drawn"
    assert main(["generate", str(run), "--prompt", "a red circle", "--control-image",
                 str(mask_shapes / "conditioning" / "000000.png"), "--steps", "2", "--width", "16", "--height", "16",
                 "--out", str(drawn), "--no-progress"]) == 0
    [png] = sorted(drawn.glob("*.png"))
    params = Image.open(png).info["parameters"]
    assert 'ControlNet 0: "Module: mask, Model: run [' in params and "ControlNet 0 files: (model) |" in params
    # --from-png finds the run's own ControlNet through the model it is given, wherever the run moved.
    moved = tmp_path / "moved" / "run"
    shutil.copytree(run, moved)
    again = tmp_path / "again"
    assert main(["generate", str(moved), "--from-png", str(png), "--out", str(again), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(next(again.glob("*.png")))))
    assert main(["generate", str(run), "--prompt", "a red circle", "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    assert "is a controlnet: give --control-image" in capsys.readouterr().err


def test_controlnet_resume_is_exact_and_caching_changes_no_loss(tiny_sd, mask_shapes, tmp_path):  # noqa: F811
    common = dict(controlnet={"proportion_empty_prompts": 0.3}, training={"max_steps": 4},
                  checkpoint={"every_steps": 2})
    make = lambda name: cn_config(tmp_path, mask_shapes, tiny_sd, name, **common)  # noqa: E731
    assert_same_tensors(*train_straight_and_interrupted(make, tmp_path),
                        names=("model.safetensors", "ema.safetensors", "optimizer.safetensors"))
    cached = cn_config(tmp_path, mask_shapes, tiny_sd, "cached", data={"cache": {"latents": True, "text": True}},
                       **common)
    assert main(["train", str(cached), "--no-progress"]) == 0
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "straight"), rel=1e-4)
    # 24 images x 2 flips, their conditions likewise.
    assert len(list((tmp_path / "cached" / "cache" / "conditions").rglob("*.safetensors"))) == 48


def test_controlnet_with_a_unet_lora_under_bf16_keeps_trained_weights_fp32(tiny_sd, mask_shapes, tmp_path,  # noqa: F811
                                                                           caplog):
    from difftrain.config import load_config
    from difftrain.training.trainer import train

    config = cn_config(tmp_path, mask_shapes, tiny_sd, lora={"enabled": True, "rank": 2},
                       training={"mixed_precision": "bf16", "max_steps": 2, "gradient_checkpointing": True},
                       noise={"snr_gamma": 5.0}, data={"buckets": {"enabled": True, "step": 8}})
    result = train(load_config(config), progress=False)
    assert np.isfinite(result.loss)
    model = result.model_dir
    assert (model / "pytorch_lora_weights.safetensors").is_file() and (model / "config.json").is_file()
    controlnet = load_file(model / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in controlnet.values()} == {torch.float32}
    assert json.loads((model / "difftrain.json").read_text())["loras"][0]["file"] == "pytorch_lora_weights.safetensors"
    assert main(["generate", str(tmp_path / "run"), "--prompt", "a red circle", "--control-image",
                 str(mask_shapes / "conditioning" / "000001.png"), "--steps", "2", "--width", "16", "--height", "16",
                 "--out", str(tmp_path / "drawn"), "--no-progress"]) == 0
    # As another model's unit it brings its preprocessor, and says its LoRA stays behind.
    with caplog.at_level("WARNING"):
        assert main(["generate", str(tiny_sd), "--prompt", "a red circle", "--controlnet", str(tmp_path / "run"),
                     "--control-image", str(mask_shapes / "conditioning" / "000001.png"), "--steps", "2", "--width",
                     "16", "--height", "16", "--out", str(tmp_path / "unit"), "--no-progress"]) == 0
    assert "trained beside a LoRA on its base's UNet, which a --controlnet unit does not load" in caplog.text
    from difftrain.generate.infotext import parse_infotext, read_png_infotext

    [drawn] = (tmp_path / "unit").glob("*.png")
    assert parse_infotext(read_png_infotext(drawn))[2]["ControlNet 0"].startswith("Module: mask,")


def test_t2i_adapter_is_the_same_method_with_another_network(tiny_sd, mask_shapes, tmp_path, capsys,  # noqa: F811
                                                              caplog):
    from diffusers import StableDiffusionAdapterPipeline, StableDiffusionPipeline, T2IAdapter

    common = dict(t2i_adapter={"preprocess": "mask", "proportion_empty_prompts": 0.2, "validation": [
        {"image": str(mask_shapes / "conditioning" / "000000.png"), "prompt": "a red circle"}]},
        training={"max_steps": 4}, checkpoint={"every_steps": 2}, sample={"every_steps": 4},
        data={"cache": {"latents": True, "text": True}})
    make = lambda name: sd_config(tmp_path, mask_shapes, tiny_sd, name, method="t2i_adapter", **common)  # noqa: E731
    assert_same_tensors(*train_straight_and_interrupted(make, tmp_path),
                        names=("model.safetensors", "ema.safetensors", "optimizer.safetensors"))
    assert "samples at step 4: control_mask_iou" in capsys.readouterr().out
    model = tmp_path / "straight" / "model"
    manifest = json.loads((model / "difftrain.json").read_text())
    assert manifest["kind"] == "t2i-adapter" and manifest["controls"][0]["preprocess"] == "mask"
    adapter = T2IAdapter.from_pretrained(model)
    assert adapter.config.channels == [32, 64]  # one feature map per UNet level
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    parts = {k: v for k, v in base.components.items() if k != "image_encoder"}
    pipe = StableDiffusionAdapterPipeline(**parts, adapter=adapter, requires_safety_checker=False)
    mask = Image.open(mask_shapes / "conditioning" / "000000.png")
    assert pipe("a red circle", image=mask, num_inference_steps=2, height=16, width=16).images[0].size == (16, 16)
    drawn = tmp_path / "drawn"
    assert main(["generate", str(tmp_path / "straight"), "--prompt", "a red circle", "--control-image",
                 str(mask_shapes / "conditioning" / "000000.png"), "--steps", "2", "--width", "16", "--height", "16",
                 "--out", str(drawn), "--no-progress"]) == 0
    assert main(["generate", str(tmp_path / "straight"), "--prompt", "a red circle", "--control-image",
                 str(mask_shapes / "conditioning" / "000000.png"), "--control-end", "0.5", "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 2
    assert "T2I-Adapter pipeline acts on every step" in capsys.readouterr().err
    # An adapter's trained weight is in its manifest, not its weights: named as --controlnet without a weight it
    # draws at that weight, as the run drawn as the model does (it drew at 1).
    from difftrain.generate.infotext import read_png_infotext

    half = tmp_path / "half"
    shutil.copytree(tmp_path / "straight", half)
    written = json.loads((half / "model" / "difftrain.json").read_text())
    written["controls"][0]["scale"] = 0.5
    (half / "model" / "difftrain.json").write_text(json.dumps(written))
    control = ["--control-image", str(mask_shapes / "conditioning" / "000000.png")]
    same = ["--prompt", "a red circle", "--steps", "2", "--width", "16", "--height", "16", "--seed", "3",
            "--no-progress"]
    assert main(["generate", str(half), *control, *same, "--out", str(tmp_path / "own")]) == 0
    assert main(["generate", str(tiny_sd), "--controlnet", str(half), *control, *same, "--out",
                 str(tmp_path / "unit")]) == 0
    [own], [unit] = (sorted((tmp_path / name).glob("*.png")) for name in ("own", "unit"))
    assert "Weight: 0.5" in read_png_infotext(unit) and np.array_equal(np.asarray(Image.open(own)),
                                                                        np.asarray(Image.open(unit)))
    # ... and a run continuing it at another conditioning_scale is told
    capsys.readouterr()
    config = sd_config(tmp_path, mask_shapes, tiny_sd, "continued", method="t2i_adapter", training={"max_steps": 1},
                       t2i_adapter={"model": str(half), "preprocess": "mask"})
    assert main(["train", str(config), "--no-progress"]) == 0
    assert "was trained and is drawn at conditioning_scale 0.5: this run trains it at" in caplog.text


def test_a_controlnet_with_the_standard_hint_encoder_also_writes_the_original_single_file(mask_shapes, tmp_path):
    from diffusers import ControlNetModel
    from safetensors import safe_open

    from difftrain.models.tiny_sd import write_tiny_sd

    eight_x = write_tiny_sd(tmp_path / "sd8x", vae_channels=(8, 8, 8, 8))  # SD's 8x VAE: 32 px -> 4x4 latents
    config = cn_config(tmp_path, mask_shapes, eight_x, data={"resolution": 32}, training={"max_steps": 2},
                       output={"single_file": True, "single_file_dtype": "fp32"})
    assert main(["train", str(config), "--no-progress"]) == 0
    model = tmp_path / "run" / "model"
    with safe_open(model / "controlnet.safetensors", "pt") as handle:
        keys, facts = set(handle.keys()), handle.metadata()
    assert all(key.startswith("control_model.") for key in keys) and "control_model.input_hint_block.14.weight" in keys
    assert facts["method"] == "controlnet" and facts["preprocess"] == "mask"
    folder = ControlNetModel.from_pretrained(model)
    back = ControlNetModel.from_single_file(str(model / "controlnet.safetensors"), config=str(model),
                                            local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(folder.state_dict().values(), back.state_dict().values()))


def test_controlnet_refusals_name_the_key_and_the_numbers(tiny_sd, mask_shapes, tmp_path, capsys):  # noqa: F811
    from difftrain.models.tiny_sd import write_tiny_controlnet

    wide = write_tiny_controlnet(tiny_sd, tmp_path / "wide", cross_attention_dim=48)
    config = cn_config(tmp_path, mask_shapes, tiny_sd, "misfit", controlnet={"model": str(wide)})
    assert main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "controlnet.model" in err and "cross_attention_dim) is 48" in err and "has 32" in err

    config = cn_config(tmp_path, mask_shapes, tiny_sd, "single", output={"single_file": True})
    assert main(["train", str(config), "--no-progress"]) == 2
    assert "output.single_file" in capsys.readouterr().err and not (tmp_path / "single" / "checkpoints").exists()

    config = cn_config(tmp_path, mask_shapes, tiny_sd, "dropout", text2image={"caption_dropout": 0.1})
    assert main(["train", str(config), "--no-progress"]) == 2
    assert "controlnet.proportion_empty_prompts" in capsys.readouterr().err

    plain = mask_shapes.parent / "plain"
    from difftrain.data.shapes import write_shapes_dataset

    write_shapes_dataset(plain, num_images=4, size=16)
    config = cn_config(tmp_path, plain, tiny_sd, "nocond", controlnet={"validation": []})
    assert main(["train", str(config), "--no-progress"]) == 2
    assert "no conditioning images" in capsys.readouterr().err

    config = cn_config(tmp_path, mask_shapes, tiny_sd, "depth", controlnet={"preprocess": "depth"})
    assert main(["train", str(config), "--no-progress"]) == 2
    assert "annotator" in capsys.readouterr().err

    config = cn_config(tmp_path, mask_shapes, tiny_sd, "gone", controlnet={"validation": [
        {"image": str(tmp_path / "gone.png"), "prompt": "a red circle"}]})
    assert main(["train", str(config), "--no-progress"]) == 2
    assert "controlnet.validation[0].image" in capsys.readouterr().err


def test_t2i_adapters_fit_the_unet_they_steer(tiny_sd):  # noqa: F811
    from diffusers import T2IAdapter, UNet2DConditionModel

    from difftrain.models.control import ControlNetError, adapter_for_unet, check_fits

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")  # widths 32, 64
    assert adapter_for_unet(unet, 2).config.channels == [32, 64]
    with pytest.raises(ControlNetError, match="last two widths are equal"):
        adapter_for_unet(unet, 2, "light_adapter")
    # A released SD 1.x light adapter has channels 320, 640, 1280 and gives four maps: it fits SD's UNet.
    sd_like = UNet2DConditionModel.from_config({**unet.config, "block_out_channels": [32, 64, 64],
                                                "down_block_types": ["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
                                                "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2})
    light = adapter_for_unet(sd_like, 2, "light_adapter", num_res_blocks=1)
    assert light.config.channels == [32, 64]
    check_fits(light, sd_like, "light")
    features = light(torch.zeros(1, 3, 16, 16))
    assert [f.shape[1] for f in features] == [32, 64, 64]
    with pytest.raises(ControlNetError, match=r"feature widths \(channels\) is \(32, 64, 64\)"):
        check_fits(light, unet, "light")
    assert isinstance(light, T2IAdapter)


def test_agreement_scores_a_faithful_image_high_and_a_displaced_one_low():
    import random

    from PIL import ImageChops

    from difftrain.data.conditioning import Preprocess
    from difftrain.data.shapes import draw_shape_and_mask
    from difftrain.evaluate.control import agreement

    image, mask = draw_shape_and_mask(random.Random(1), 64, "red", "circle")
    displaced = ImageChops.offset(image, 20, 20)  # the same shape, 20 px off (wrapping around)
    name, faithful = agreement(Preprocess("mask"), mask, image)
    assert name == "control_mask_iou" and faithful > 0.95
    assert agreement(Preprocess("mask"), mask, displaced)[1] < 0.6
    edges = Preprocess("canny")(image)
    assert agreement(Preprocess("canny"), edges, image) == ("control_edge_f1", 1.0)
    assert agreement(Preprocess("canny"), edges, displaced)[1] < 0.3
    assert agreement(Preprocess("none"), mask, image) is None


def test_a_grey_scale_adapter_draws_and_trains_and_the_wrong_kind_is_named(tiny_sd, mask_shapes, tmp_path,  # noqa: F811
                                                                           capsys):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from difftrain.data.conditioning import grey
    from difftrain.models.control import ControlNetError, adapter_for_unet, check_fits

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    rgb = adapter_for_unet(unet, 2, num_res_blocks=1)
    torch.manual_seed(0)
    one = type(rgb).from_config({**rgb.config, "in_channels": 1})  # as TencentARC's canny and sketch adapters
    one.save_pretrained(tmp_path / "grey-adapter")
    condition = str(mask_shapes / "conditioning" / "000000.png")
    assert main(["generate", str(tiny_sd), "--prompt", "a red circle", "--controlnet", str(tmp_path / "grey-adapter"),
                 "--control-image", condition, "--steps", "2", "--width", "16", "--height", "16",
                 "--out", str(tmp_path / "drawn"), "--no-progress"]) == 0
    config = sd_config(tmp_path, mask_shapes, tiny_sd, "grey", method="t2i_adapter", training={"max_steps": 2},
                       t2i_adapter={"model": str(tmp_path / "grey-adapter"), "preprocess": "mask",
                                    "validation": [{"image": condition, "prompt": "a red circle"}]},
                       sample={"every_steps": 2})
    assert main(["train", str(config), "--no-progress"]) == 0
    assert "samples at step 2: control_mask_iou" in capsys.readouterr().out
    # Training reads the condition as the pipeline does: PIL's own grey, exactly.
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(pixels).convert("L"))
    assert np.array_equal(grey(torch.from_numpy(pixels).permute(2, 0, 1))[0].numpy(), expected)

    # The wrong kind of network, or a file that is none, is named with what to do.
    wrong = cn_config(tmp_path, mask_shapes, tiny_sd, "wrong", controlnet={"model": str(tmp_path / "grey-adapter")})
    assert main(["train", str(wrong), "--no-progress"]) == 2
    assert "is a T2I-Adapter, not a ControlNet: method t2i_adapter continues it" in capsys.readouterr().err
    from safetensors.torch import save_file

    save_file({"lora_unet_down.alpha": torch.tensor(1.0)}, tmp_path / "not-a-controlnet.safetensors")
    assert main(["generate", str(tiny_sd), "--prompt", "x", "--controlnet",
                 str(tmp_path / "not-a-controlnet.safetensors"), "--control-image", condition, "--out", str(tmp_path / "y"), "--no-progress"]) == 2
    assert "cannot load a ControlNet or T2I-Adapter from it" in capsys.readouterr().err
    four = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32), conditioning_channels=4)
    with pytest.raises(ControlNetError, match="its condition has 4 channels; difftrain feeds 3"):
        check_fits(four, unet, "four")
    # SD's hint encoder (8x down) on the tiny model's 2x VAE: named, not a tensor-size traceback mid-draw.
    ControlNetModel.from_unet(unet).save_pretrained(tmp_path / "eight-times")
    assert main(["generate", str(tiny_sd), "--prompt", "x", "--controlnet", str(tmp_path / "eight-times"),
                 "--control-image", condition, "--out", str(tmp_path / "z"), "--no-progress"]) == 2
    assert ("it shrinks its condition 8x, and this model's VAE makes a latent of every 2x2 pixels"
            in capsys.readouterr().err)


def test_a_controlnet_trained_at_another_weight_is_saved_to_be_drawn_at_weight_one(tiny_sd, mask_shapes,  # noqa: F811
                                                                                   tmp_path, caplog):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from difftrain.models.control import with_weight_applied

    # The fold is exact: the copy at weight 1 gives what the original gives at 0.5.
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    torch.manual_seed(0)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
        torch.nn.init.normal_(conv.weight, std=0.1)
        torch.nn.init.normal_(conv.bias, std=0.1)
    inputs = dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor(500),
                  encoder_hidden_states=torch.randn(1, 77, unet.config.cross_attention_dim),
                  controlnet_cond=torch.rand(1, 3, 16, 16), return_dict=False)
    half = net(**inputs, conditioning_scale=0.5)
    folded = with_weight_applied(net, 0.5)(**inputs, conditioning_scale=1.0)
    for a, b in zip([*half[0], half[1]], [*folded[0], folded[1]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    config = cn_config(tmp_path, mask_shapes, tiny_sd, "half", controlnet={"conditioning_scale": 0.5},
                       training={"max_steps": 2, "ema": {"enabled": False}})
    assert main(["train", str(config), "--no-progress"]) == 0
    model = tmp_path / "half" / "model"
    control = json.loads((model / "difftrain.json").read_text())["controls"][0]
    assert control["scale"] == 1.0 and control["folded_scale"] == 0.5
    [state] = (tmp_path / "half" / "checkpoints").glob("step-*/model.safetensors")
    trained = {key.split("controlnet.", 1)[-1]: value for key, value in load_file(state).items()}
    saved = load_file(model / "diffusion_pytorch_model.safetensors")
    assert torch.equal(saved["controlnet_mid_block.weight"], trained["controlnet_mid_block.weight"] * 0.5)
    assert torch.equal(saved["controlnet_cond_embedding.conv_in.weight"],
                       trained["controlnet_cond_embedding.conv_in.weight"])  # the rest as trained
    # Continued at the same weight, it would train at 0.25 of its first strength: said.
    more = cn_config(tmp_path, mask_shapes, tiny_sd, "more", training={"max_steps": 1},
                     controlnet={"conditioning_scale": 0.5, "model": str(tmp_path / "half")})
    with caplog.at_level("WARNING"):
        assert main(["train", str(more), "--no-progress"]) == 0
    assert ("saved folded into its weights: at controlnet.conditioning_scale 0.5 this run trains it at 0.25"
            in caplog.text)
    continued = json.loads((tmp_path / "more" / "model" / "difftrain.json").read_text())["controls"][0]
    assert continued["folded_scale"] == 0.25


def test_a_hugging_face_data_set_brings_its_conditioning_column(tiny_sd, mask_shapes, tmp_path, capsys):  # noqa: F811
    """diffusers' train_controlnet.py layout (image, text and conditioning_image columns, as fusing/fill50k):
    each row's conditioning image is read from its column. Without the column a mask ControlNet is refused
    naming it (it said to add a metadata.jsonl column); with canny the edges are computed from the images."""
    datasets = pytest.importorskip("datasets")
    from difftrain.data.folder import ConditioningFiles
    from difftrain.data.hf import HFOptions
    from difftrain.data.images import load_image_bytes
    from difftrain.data.sources import open_source

    entries = [json.loads(line) for line in (mask_shapes / "metadata.jsonl").read_text().splitlines()][:8]
    columns = {"image": [Image.open(mask_shapes / e["file_name"]).convert("RGB") for e in entries],
               "text": [e["text"] for e in entries],
               "conditioning_image": [Image.open(mask_shapes / e["conditioning_image"]).convert("RGB") for e in entries]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "conditioning_image": datasets.Image()})
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(tmp_path / "fill"))
    datasets.Dataset.from_dict({key: columns[key] for key in ("image", "text")}).save_to_disk(str(tmp_path / "plain"))
    source = open_source("hf", tmp_path / "fill", progress=False, conditioning=ConditioningFiles(),
                         hf=HFOptions(caption_column="text"))
    assert source.has_conditioning
    for row in (0, 5):  # paired row by row
        assert np.array_equal(np.asarray(load_image_bytes(source.read(row).conditioning)),
                              np.asarray(columns["conditioning_image"][row]))
    hf = {"source": "hf", "path": str(tmp_path / "fill"), "caption_column": "text"}
    config = cn_config(tmp_path, mask_shapes, tiny_sd, "hf", data=hf, training={"max_steps": 1})
    assert main(["train", str(config), "--no-progress"]) == 0
    assert "8 records, 0 skipped at start, 0 replaced at read time" in capsys.readouterr().out
    config = cn_config(tmp_path, mask_shapes, tiny_sd, "nocolumn", data={**hf, "path": str(tmp_path / "plain")})
    assert main(["train", str(config), "--no-progress"]) == 2
    assert "the data set has no column 'conditioning_image' (conditioning_column)" in capsys.readouterr().err
