"""Class-conditional pixel models (model.classes): training, the manifest, guided sampling, the CLI."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
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
    assert Image.open(run / "samples" / "step-00000002.png").size == (2 * 128 + 6, 2 * 128 + 6)  # 4 previews
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
    _, red = sample_grid(run, num_images=1, scheduler="ddim", steps=3, seed=4, classes=["a red circle"])
    _, blue = sample_grid(run, num_images=1, scheduler="ddim", steps=3, seed=4, classes=["a blue square"])
    assert red[0].tobytes() != blue[0].tobytes()  # same noise, another label: another image
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
    from difftrain.config import parse_config

    # the config strips the names it is given; the list keeps its order
    named = parse_config({"method": "unconditional", "data": {"path": "d"},
                          "model": {"classes": [" a hound", "a dog", "a cat", "a bird"]}}).model.classes
    assert resolve_classes(named, files) == ["a hound", "a dog", "a cat", "a bird"]
    with pytest.raises(ConfigError, match=r"1 caption\(s\) of the data are no class in the list, e.g. 'a hound' "
                                          r"\(/d/b.png\): add them to model.classes"):
        resolve_classes(["a cat", "a dog"], files)
    with pytest.raises(ConfigError, match="no captions beside its images"):
        resolve_classes("captions", [("shard-0.tar", "/d/shard-0.tar", [])])
    # A metadata.jsonl caption keeps its spaces (a .txt one is stripped): "a cat " names the class "a cat", as the
    # list's names are stripped too; "a cat " and "a cat" were two classes, and no list could name the first.
    from difftrain.methods.unconditional import class_labels

    spaced = [("a.png", "/d/a.png", ["a cat "]), ("b.png", "/d/b.png", ["a cat"]), ("c.png", "/d/c.png", [" "])]
    assert resolve_classes("captions", spaced) == ["a cat"] and resolve_classes(["a cat"], spaced) == ["a cat"]
    assert class_labels(["a cat ", "a cat", "a dog"], {"a cat": 0}, 1).tolist() == [0, 0, 1]


def test_a_class_config_on_a_text_to_image_run_is_refused():
    from difftrain.config import parse_config

    with pytest.raises(ConfigError, match="model.classes: class labels condition the unconditional method"):
        parse_config({"method": "text2image", "data": {"path": "d"}, "model": {"base": "b", "classes": "captions"}})


def test_guidance_is_u_plus_w_times_c_minus_u_and_one_is_the_conditional_prediction():
    unet = _class_unet()
    x, t, labels = torch.randn(2, 3, 8, 8), torch.tensor(10), torch.tensor([0, 2])
    with torch.no_grad():
        conditional = unet(x, t, class_labels=labels).sample
        unconditional = unet(x, t, class_labels=torch.tensor([3, 3])).sample  # the last label: no class
        assert torch.equal(unet_denoiser(unet, labels, 1.0)(x, t), conditional)
        guided = unet_denoiser(unet, labels, 3.0)(x, t)
    assert torch.allclose(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5)
    assert not torch.allclose(conditional, unconditional, atol=1e-3)  # the label changes the prediction


def test_training_labels_are_the_captions_classes_and_dropped_labels_the_last(make_config):
    """The loss's labels use the convention sampling guides with: index len(classes) is "no class"."""
    from types import SimpleNamespace

    from difftrain.config import load_config
    from difftrain.methods import build_method

    seen = []

    def unet(x, t, class_labels=None):
        seen.append(class_labels.tolist())
        return SimpleNamespace(sample=torch.zeros_like(x))

    captions = ["a red circle", "a blue square", "", "a red circle"]
    batch = {"pixel_values": torch.zeros(4, 3, 16, 16), "caption": captions}
    red, blue = CLASSES.index("a red circle"), CLASSES.index("a blue square")
    for dropout, guidance, expected in ((0.0, 1.0, [red, blue, 12, red]), (0.99, 3.0, [12, 12, 12, 12])):
        config = make_config(model={"preset": "tiny", "classes": "captions", "class_dropout": dropout,
                                    "class_guidance": guidance})
        method = build_method(load_config(config))
        method.build_dataset(progress=False)
        method.loss({"unet": unet}, batch, torch.Generator().manual_seed(0))
        assert seen.pop() == expected  # an uncaptioned image trains as "no class" too
        # The data loader's collate labels the batch (in a worker: it survives pickling); the loss
        # takes those labels and draws the same dropout.
        items = [{"epoch": 0, "batch": 0, "skipped": [], "pixel_values": torch.zeros(3, 16, 16), "caption": caption}
                 for caption in captions]
        collated = pickle.loads(pickle.dumps(method.collate))(items)
        assert collated["class_labels"].tolist() == [red, blue, 12, red]
        method.loss({"unet": unet}, collated, torch.Generator().manual_seed(0))
        assert seen.pop() == expected


def test_batched_sampling_gives_each_batch_its_own_labels():
    from difftrain.sampling.loop import sample_unet, sample_unet_batched

    unet = _class_unet()
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
    batched = sample_unet_batched(unet, config, 3, "ddim", 2, 7, 2, labels=[0, 1, 2], guidance_scale=2.0)
    pieces = (sample_unet(unet, config, 2, "ddim", 2, 7, [0, 1], 2.0)
              + sample_unet(unet, config, 1, "ddim", 2, 9, [2], 2.0))
    assert [i.tobytes() for i in batched] == [i.tobytes() for i in pieces]
    assert batched[2].tobytes() != sample_unet(unet, config, 1, "ddim", 2, 9, [0], 2.0)[0].tobytes()


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_image_i_comes_from_seed_plus_i_whatever_the_batch_size(scheduler):
    """So an evaluation's images do not change with its batch size, and seed 1's are not seed 0's shifted by one."""
    from difftrain.sampling.loop import sample_unet_batched

    unet = _class_unet()
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
    draws = {size: np.stack([np.asarray(image, dtype=int) for image in
                             sample_unet_batched(unet, config, 4, scheduler, 3, 7, size, labels=[0, 1, 2, 0])])
             for size in (1, 4)}
    assert np.abs(draws[1] - draws[4]).max() <= 1  # (batched kernels may round otherwise)
    later = np.stack([np.asarray(image, dtype=int) for image in
                      sample_unet_batched(unet, config, 2, scheduler, 3, 8, 2, labels=[1, 2])])
    assert np.abs(later - draws[4][1:3]).max() <= 1  # seed 8's first image is seed 7's second


def _class_unet() -> UNet2DModel:
    """A random 8 px UNet2DModel with three classes and "no class"."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                       num_class_embeds=4).eval()


def test_resuming_on_data_with_other_classes_is_refused_even_when_the_data_may_change(make_config, tmp_path, capsys):
    from difftrain.data.shapes import write_shapes_dataset

    config = make_config(model={"preset": "tiny", "classes": "captions"}, training={"max_steps": 2})
    assert main(["train", str(config), "--no-progress"]) == 0
    fewer = write_shapes_dataset(tmp_path / "fewer", num_images=6, size=16, seed=0)  # 6 of the 12 classes
    capsys.readouterr()
    assert main(["train", str(config), "--no-progress", "--resume", "latest", "--allow-data-change",
                 "--set", "training.max_steps=4", "--set", f"data.path={fewer}"]) == 2
    error = capsys.readouterr().err
    assert "it was trained on the classes 12 (a blue circle, a blue square" in error
    assert "this data gives 6 (a blue circle, a green circle" in error


def test_a_manifest_whose_classes_do_not_fit_the_unet_is_named(make_config, tmp_path, capsys):
    config = make_config(model={"preset": "tiny", "classes": "captions"}, training={"max_steps": 1})
    assert main(["train", str(config), "--no-progress"]) == 0
    manifest_file = tmp_path / "run" / "model" / "difftrain.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["conditioning"]["classes"] = manifest["conditioning"]["classes"][:5]
    manifest_file.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "run" / "model"), "--steps", "2"]) == 2
    assert "names 5 classes, which needs a UNet with 6 class embeddings (the last: no class); its UNet has 13" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("model, data, message", [
    ({"class_guidance": 2}, {}, "model.class_guidance: it applies to class-conditional models"),
    ({"classes": "captions"}, {"captions": "none"}, "each image's caption names its class, and data.captions is none"),
    ({"classes": "captions", "class_dropout": 0}, {}, "only dropped labels train"),
    ({"classes": ["a cat", "a cat"]}, {}, "give distinct, non-empty class names"),
])
def test_class_settings_that_cannot_work_are_refused_naming_the_key(model, data, message):
    from difftrain.config import parse_config

    with pytest.raises(ConfigError, match=message):
        parse_config({"method": "unconditional", "data": {"path": "d", **data}, "model": model})
