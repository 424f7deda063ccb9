"""Class-conditional pixel models (model.classes): training, the manifest, guided sampling, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image
from test_train_e2e import assert_same_checkpoint

from difftrain.cli import main
from difftrain.data.shapes import PROMPTS
from difftrain.errors import ConfigError
from difftrain.methods.unconditional import resolve_classes
from difftrain.sampling.loop import unet_denoiser

CLASSES = sorted(PROMPTS)  # 'captions' takes the shapes set's 12 captions, sorted


def test_a_class_run_records_its_classes_and_samples_the_ones_asked_for(make_config, tmp_path, capsys):
    config = make_config(model={"preset": "tiny", "classes": "captions", "class_guidance": 2.5},
                         training={"max_steps": 2}, sample={"every_steps": 2, "num_images": 4})
    assert main(["train", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    manifest = json.loads((run / "model" / "difftrain.json").read_text())
    assert manifest["conditioning"]["classes"] == CLASSES and manifest["conditioning"]["guidance_scale"] == 2.5
    # diffusers loads the UNet as it is: 12 classes and the "no class" label
    unet = UNet2DModel.from_pretrained(run / "model", subfolder="unet")
    assert unet.config.num_class_embeds == 13
    assert Image.open(run / "samples" / "step-00000002.png").size[0] > 0
    capsys.readouterr()

    out = tmp_path / "grid.png"
    assert main(["sample", str(run), "--num", "4", "--steps", "3", "--scheduler", "ddim", "--out", str(out),
                 "--class", "a red circle", "--class", "a blue square"]) == 0
    assert "classes in turn: a red circle, a blue square" in capsys.readouterr().out
    assert Image.open(out).size == (2 * 128 + 6, 2 * 128 + 6)

    from difftrain.generate.unconditional import sample_grid

    _, images = sample_grid(run, num_images=3, scheduler="ddim", steps=3, seed=4)
    assert [image.info["class"] for image in images] == CLASSES[:3]  # every class in turn by default
    _, guided = sample_grid(run, num_images=3, scheduler="ddim", steps=3, seed=4, guidance_scale=2.5)
    assert [i.tobytes() for i in guided] == [i.tobytes() for i in images]  # the default is the manifest's guidance
    _, other = sample_grid(run, num_images=3, scheduler="ddim", steps=3, seed=4, guidance_scale=6)
    assert [i.tobytes() for i in other] != [i.tobytes() for i in images]
    shutil.rmtree(run / "model")  # as if the run were still going: its latest checkpoint draws the same
    _, from_checkpoint = sample_grid(run, num_images=3, scheduler="ddim", steps=3, seed=4)
    assert [i.tobytes() for i in from_checkpoint] == [i.tobytes() for i in images]


def test_asking_for_a_class_the_model_lacks_names_its_classes(make_config, tmp_path, capsys):
    classed = make_config("classed", model={"preset": "tiny", "classes": "captions"}, training={"max_steps": 1})
    plain = make_config("plain", training={"max_steps": 1})
    assert main(["train", str(classed), "--no-progress"]) == 0 and main(["train", str(plain), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "classed"), "--class", "a pink hexagon", "--steps", "2"]) == 2
    assert "no class 'a pink hexagon'; this model's classes: 'a blue circle', 'a blue square'" in capsys.readouterr().err
    for flags in (["--class", "a red circle"], ["--cfg", "3"]):
        assert main(["sample", str(tmp_path / "plain"), *flags, "--steps", "2"]) == 2
        assert "this model draws without classes" in capsys.readouterr().err


def test_class_runs_resume_bitwise(make_config, tmp_path):
    model = {"preset": "tiny", "classes": "captions", "class_dropout": 0.5}
    straight = make_config("straight", model=model, training={"max_steps": 4}, checkpoint={"every_steps": 2})
    assert main(["train", str(straight), "--no-progress"]) == 0
    halves = make_config("halves", model=model, training={"max_steps": 2}, checkpoint={"every_steps": 2})
    assert main(["train", str(halves), "--no-progress"]) == 0
    assert main(["train", str(halves), "--no-progress", "--set", "training.max_steps=4", "--resume", "latest"]) == 0
    assert_same_checkpoint(tmp_path / "straight/checkpoints/step-00000004", tmp_path / "halves/checkpoints/step-00000004")


def test_the_classes_a_config_names_are_checked_against_the_captions():
    files = [("a.png", "/d/a.png", ["a cat"]), ("b.png", "/d/b.png", ["a dog", "a hound"]), ("c.png", "/d/c.png", [])]
    assert resolve_classes("captions", files) == ["a cat", "a dog", "a hound"]
    assert resolve_classes([" a hound", "a dog", "a cat", "a bird"], files) == ["a hound", "a dog", "a cat", "a bird"]
    with pytest.raises(ConfigError, match=r"1 caption\(s\) of the data are no class in the list, e.g. 'a hound' "
                                          r"\(/d/b.png\): add them to model.classes"):
        resolve_classes(["a cat", "a dog"], files)
    with pytest.raises(ConfigError, match="no captions beside its images"):
        resolve_classes("captions", [("shard-0.tar", "/d/shard-0.tar", [])])


def test_a_class_config_on_a_text_to_image_run_is_refused():
    from difftrain.config import parse_config

    with pytest.raises(ConfigError, match="model.classes: class labels condition the unconditional method"):
        parse_config({"method": "text2image", "data": {"path": "d"}, "model": {"base": "b", "classes": "captions"}})


def test_guidance_is_u_plus_w_times_c_minus_u_and_one_is_the_conditional_prediction():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                       num_class_embeds=4).eval()
    x, t, labels = torch.randn(2, 3, 8, 8), torch.tensor(10), torch.tensor([0, 2])
    with torch.no_grad():
        conditional = unet(x, t, class_labels=labels).sample
        unconditional = unet(x, t, class_labels=torch.tensor([3, 3])).sample  # the last label: no class
        assert torch.equal(unet_denoiser(unet, labels, 1.0)(x, t), conditional)
        guided = unet_denoiser(unet, labels, 3.0)(x, t)
    assert torch.allclose(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5)
    assert not torch.allclose(conditional, unconditional, atol=1e-3)  # the label changes the prediction
