"""Model manifests and the one inference loader: what training writes is what inference uses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_text2image import sd_config, tiny_sd  # noqa: F401

from difftrain.cli import main
from difftrain.generate.loader import ModelNotFound

PROMPTS = ["a red circle", "a blue square"]


def grid_cells(path: Path, count: int, size: int) -> list[np.ndarray]:
    """The images of a training preview grid, back at their own size (the grid enlarges by whole factors)."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    scale, gutter = max(1, 128 // size), 2
    columns = int(np.ceil(np.sqrt(count)))
    cells = []
    for i in range(count):
        x, y = gutter + (i % columns) * (size * scale + gutter), gutter + (i // columns) * (size * scale + gutter)
        cells.append(grid[y : y + size * scale : scale, x : x + size * scale : scale])
    return cells


def generated(run: Path, prompt: str, out: Path, scheduler: str, steps: int) -> np.ndarray:
    args = ["generate", str(run), "--prompt", prompt, "--seed", "0", "--scheduler", scheduler, "--steps", str(steps),
            "--cfg", "7.5", "--width", "16", "--height", "16", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    return np.asarray(Image.open(sorted(out.glob("*.png"))[-1]).convert("RGB"))


def test_validation_images_are_what_generate_gives_with_a_short_text_context(tiny_sd, shapes_dir, tmp_path):  # noqa: F811
    config = sd_config(tmp_path, shapes_dir, tiny_sd, text2image={"max_length": 8}, training={"max_steps": 2},
                       sample={"every_steps": 2, "prompts": PROMPTS, "steps": 4, "scheduler": "euler_a"})
    assert main(["train", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    manifest = json.loads((run / "model" / "difftrain.json").read_text())
    assert manifest["kind"] == "stable-diffusion" and manifest["conditioning"]["max_length"] == 8
    # diffusers loading the folder itself encodes prompts to 8 tokens too.
    assert json.loads((run / "model" / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"] == 8
    previews = grid_cells(run / "samples" / "step-00000002.png", len(PROMPTS), 16)
    for index, prompt in enumerate(PROMPTS):
        image = generated(run, prompt, tmp_path / "out", "euler_a", 4)
        assert np.abs(image.astype(int) - previews[index].astype(int)).max() <= 1, prompt
    # Told nothing of the context length, generate encodes 77 tokens (what it did before): another image.
    manifest["conditioning"]["max_length"] = None
    (run / "model" / "difftrain.json").write_text(json.dumps(manifest))
    tokenizer_config = run / "model" / "tokenizer" / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()), "model_max_length": 77}))
    image = generated(run, PROMPTS[0], tmp_path / "out", "euler_a", 4)
    assert np.abs(image.astype(int) - previews[0].astype(int)).max() > 1


@pytest.mark.parametrize(
    "settings, kind, files",
    [
        ({}, "stable-diffusion", {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"}),
        ({"lora": {"enabled": True}}, "lora", {"pytorch_lora_weights.safetensors", "scheduler"}),
        ({"output": {"trained_only": True}}, "stable-diffusion-parts", {"unet", "scheduler"}),
        ({"method": "textual_inversion", "textual_inversion": {"token": "<sq>", "initializer": "square"}},
         "embedding", {"learned_embeds.safetensors", "scheduler"}),
    ],
)
def test_every_model_a_run_writes_explains_itself_and_loads_anywhere(tiny_sd, shapes_dir, tmp_path, settings, kind,  # noqa: F811
                                                                     files):
    from diffusers import StableDiffusionPipeline

    from difftrain import load_pipeline

    # Textual Inversion leaves the UNet frozen: it keeps its base's target (config refuses another).
    prediction = "epsilon" if kind == "embedding" else "v_prediction"
    noise = {} if kind == "embedding" else {"noise": {"prediction_type": prediction}}
    config = sd_config(tmp_path, shapes_dir, tiny_sd, training={"max_steps": 1}, **noise, **settings)
    assert main(["train", str(config), "--no-progress"]) == 0
    for folder, weights in (("model", "ema"), ("model-no-ema", "raw")):
        manifest = json.loads((tmp_path / "run" / folder / "difftrain.json").read_text())
        assert manifest["format"] == "difftrain-model" and manifest["version"] == 1
        assert (manifest["kind"], manifest["weights"]) == (kind, weights)
        assert manifest["noise"]["prediction_type"] == prediction
        assert files <= {p.name for p in (tmp_path / "run" / folder).iterdir()}
        assert (manifest["base"] is None) == (kind == "stable-diffusion")
    # The model folder alone, moved away from its run, still loads: the manifest names its base.
    moved = shutil.copytree(tmp_path / "run" / "model", tmp_path / "elsewhere")
    pipe = load_pipeline(moved)
    assert pipe.manifest.kind == kind and pipe.scheduler.config.prediction_type == prediction
    if kind == "stable-diffusion":  # and diffusers itself is not disturbed by the manifest
        assert StableDiffusionPipeline.from_pretrained(moved).unet is not None
    else:  # copied to a machine without its base: the message names the manifest entry to fix
        manifest = json.loads((moved / "difftrain.json").read_text())
        manifest["base"]["model"] = str(tmp_path / "gone")
        (moved / "difftrain.json").write_text(json.dumps(manifest))
        with pytest.raises(ModelNotFound, match=r"on a base model that does not load: .*difftrain.json"):
            load_pipeline(moved)
    # The EMA folder asked for raw weights says where they are rather than drawing the EMA ones.
    with pytest.raises(ModelNotFound, match=r"holds a run's EMA weights; for its raw ones \(--no-ema\) give "
                                            r".*run/model-no-ema"):
        load_pipeline(tmp_path / "run" / "model", use_ema=False)
    # A run whose raw weights are missing (stopped between the two writes) does not answer --no-ema with EMA ones.
    shutil.rmtree(tmp_path / "run" / "model-no-ema")
    with pytest.raises(ModelNotFound, match=r"its raw weights \(model-no-ema/\) are missing"):
        load_pipeline(tmp_path / "run", use_ema=False)


def test_load_pipeline_takes_a_plain_diffusers_folder_and_a_single_file(tiny_sd, tmp_path, monkeypatch):  # noqa: F811
    from difftrain import load_pipeline
    from difftrain.generate.loader import locate

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "sd").symlink_to(tiny_sd)
    assert locate("~/sd").folder == tmp_path / "sd"  # a home-relative path is a local folder, not a hub id
    from difftrain.models.single_file import save_single_file

    pipe = load_pipeline(tiny_sd)
    assert pipe.manifest.kind == "stable-diffusion" and pipe.model_name == tiny_sd.name
    file = tmp_path / "tiny.safetensors"
    save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, file)
    single = load_pipeline(file, config=str(tiny_sd))
    assert single.model_name == "tiny" and single.unet.config.sample_size == pipe.unet.config.sample_size


def test_a_manifest_from_a_newer_difftrain_is_refused_by_version(tiny_sd, tmp_path):  # noqa: F811
    from difftrain import load_pipeline
    from difftrain.models.manifest import ManifestError

    folder = shutil.copytree(tiny_sd, tmp_path / "model")
    (folder / "difftrain.json").write_text(json.dumps({"format": "difftrain-model", "version": 99, "kind": "lora"}))
    with pytest.raises(ManifestError, match="manifest version 99 was written by a newer difftrain"):
        load_pipeline(folder)


@pytest.mark.parametrize("fields, message", [
    ({"loras": {"file": "a.safetensors"}}, "loras is {'file': 'a.safetensors'}; it must be a list"),
    ({"loras": [{"file": "a.safetensors", "weight": "0.8"}]}, "loras[0].weight is '0.8'; it must be a number"),
    ({"embeddings": ["cat.safetensors"]}, "embeddings[0] is 'cat.safetensors'; it must be an object"),
    ({"conditioning": {"clip_skip": "2"}}, "conditioning.clip_skip is '2'; it must be a whole number >= 1 or null"),
    ({"conditioning": {"resolution": 0}}, "conditioning.resolution is 0; it must be a whole number"),
    ({"weights": "best"}, "weights is 'best'; it must be \"ema\" or \"raw\""),
    ({"base": "runwayml/stable-diffusion-v1-5"}, "base is 'runwayml/stable-diffusion-v1-5'; it must be an object or null"),
])
def test_a_hand_edited_manifest_is_refused_by_the_field_it_got_wrong(tiny_sd, tmp_path, fields, message):  # noqa: F811
    from difftrain import load_pipeline
    from difftrain.models.manifest import ManifestError

    folder = shutil.copytree(tiny_sd, tmp_path / "model")
    manifest = {"format": "difftrain-model", "version": 1, "kind": "stable-diffusion", **fields}
    (folder / "difftrain.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError) as refused:
        load_pipeline(folder)
    assert str(refused.value).startswith(f"{folder / 'difftrain.json'}: {message}")


def test_a_pixel_model_samples_from_its_manifest_and_refuses_generate(make_config, tmp_path, capsys):
    assert main(["train", str(make_config(training={"max_steps": 2})), "--no-progress"]) == 0
    run = tmp_path / "run"
    for place in (run / "model", run / "checkpoints" / "step-00000002"):
        manifest = json.loads((place / "difftrain.json").read_text())
        assert manifest["kind"] == "unconditional" and manifest["architecture"]["unet"]["sample_size"] == 16
    assert main(["generate", str(run), "--prompt", "x"]) == 2
    assert "difftrain sample" in capsys.readouterr().err
    shutil.rmtree(run / "model")
    shutil.rmtree(run / "model-no-ema")
    assert main(["sample", str(run), "--num", "2", "--steps", "2", "--out", str(tmp_path / "g.png")]) == 0
