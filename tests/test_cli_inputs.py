"""Bad input on the command line gets one line naming the flag, file or key and what to do (exit 2), never a
traceback from inside torch, PIL or diffusers, and never a silently wrong result or a deleted file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_text2image import tiny_sd  # noqa: F401  (the fixture)

from difftrain.cli import main
from difftrain.errors import DifftrainError


def refused(argv: list[str], capsys, said: str) -> None:
    with pytest.raises(SystemExit) as exited:  # argparse's own exit for a bad value
        main(argv)
    assert exited.value.code == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["sample", "run", "--num", "0"], "argument --num: 0: give 1 or more"),  # (a traceback from the sampler)
    (["sample", "run", "--steps", "0"], "argument --steps: 0: give 1 or more"),  # (pure noise, exit 0)
    (["sample", "run", "--cfg", "nan"], "argument --cfg: nan: give a finite number"),  # (black cells)
    (["generate", "m", "--prompt", "x", "--seed", "99999999999999999999"], "give -1 to"),
    (["eval", "m", "--batch-size", "0"], "argument --batch-size: 0: give 1 or more"),
    (["lora", "merge", "m", "l.safetensors", "out", "--scale", "inf"], "argument --scale: inf: give a finite"),
    (["serve", "m", "--port", "99999"], "argument --port: 99999: give 0 to 65535"),
    (["serve", "m", "--max-size", "0"], "argument --max-size: 0: give 64 or more"),
    (["data", "check", "d", "--caption-extension", ""], "'' is no file extension"),
    (["export", "m", "out", "--opset", "5"], "argument --opset: 5: give 14 or more"),  # (pages of TorchScript)
])
def test_numbers_and_names_out_of_range_are_refused_naming_the_flag(argv, said, capsys):
    refused(argv, capsys, said)


def test_writers_never_replace_what_is_there(tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("important")
    assert main(["model", "tiny-sd", str(precious)]) == 2  # it was deleted, and a model written in its place
    assert "exists (a file): the tiny model would replace it" in capsys.readouterr().err
    assert precious.read_text() == "important"
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "notes.txt").write_text("keep")
    assert main(["data", "shapes", str(tmp_path / "set"), "--num", "2", "--size", "16"]) == 2
    assert (tmp_path / "set" / "notes.txt").read_text() == "keep"
    assert main(["data", "shapes", str(tmp_path / "new"), "--num", "2", "--size", "16"]) == 0


def test_file_arguments_that_cannot_work_are_refused_before_any_work(tiny_sd, tmp_path, capsys):  # noqa: F811
    from difftrain.models.embeddings import save_embedding

    source = tmp_path / "lora.safetensors"
    source.write_bytes(b"")
    (tmp_path / "d.safetensors").mkdir()
    for dst, said in ((source, "is the file being converted"), (tmp_path / "out.txt", "written as .safetensors"),
                      (tmp_path / "d.safetensors", "d.safetensors: a folder; give the name of the file to write")):
        assert main(["lora", "convert", str(source), str(dst), "--to", "kohya"]) == 2
        assert said in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert main(["data", "judge-shapes", str(tmp_path / "broken.png")]) == 2  # (a PIL traceback)
    assert f"{tmp_path / 'broken.png'}: " in capsys.readouterr().err
    # (it served, and failed every request): in a process of its own, so that a server that starts cannot hang here
    for args, said in (([str(tmp_path / "no-such-model")], "no-such-model does not exist"),
                       ([str(tiny_sd), "--lora-dir", str(tmp_path / "nope")], "--lora-dir")):
        served = subprocess.run([sys.executable, "-m", "difftrain", "serve", *args, "--port", "0"],
                                capture_output=True, text=True, timeout=120)
        assert served.returncode == 2 and said in served.stderr
    # An embedding for another base model, or one token twice: named, not diffusers' traceback.
    wide, _ = save_embedding(tmp_path / "wide", "<wide>", torch.zeros(1, 768))
    narrow, _ = save_embedding(tmp_path / "narrow", "<narrow>", torch.zeros(1, 32))
    draw = ["generate", str(tiny_sd), "--prompt", "a <narrow>", "--steps", "1", "--width", "32", "--height", "32",
            "--out", str(tmp_path / "out"), "--no-progress"]
    assert main([*draw, "--embedding", str(wide)]) == 2
    assert "768-wide vectors, and this model's text encoder is 32 wide" in capsys.readouterr().err
    assert main([*draw, "--embedding", str(narrow), "--embedding", str(narrow)]) == 2
    assert "give each once" in capsys.readouterr().err
    assert main([*draw, "--embedding", str(narrow)]) == 0
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"")
    for weight, said in (("nan", "give a finite weight"), ("abc", "'abc', is not a number")):
        assert main([*draw, "--lora", f"{lora}:{weight}"]) == 2
        assert said in capsys.readouterr().err


def test_malformed_files_are_named_not_tracebacks(tiny_sd, shapes_dir, tmp_path, capsys):  # noqa: F811
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    binary = next(shapes_dir.glob("*.png"))
    assert main(["config", "check", str(binary)]) == 2  # (UnicodeDecodeError)
    assert "not a text file" in capsys.readouterr().err
    (tmp_path / "unet.json").write_text("[1, 2]")
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{path: {shapes_dir}}}\nmodel: {{unet_config: {tmp_path / 'unet.json'}}}\n")
    assert main(["train", str(config), "--set", f"output_dir={tmp_path / 'run'}", "--no-progress"]) == 2
    assert "holds a JSON list, not the object" in capsys.readouterr().err
    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 2, Sampler: Euler, CFG scale: abc, Seed: 5, Size: 32x32")
    Image.new("RGB", (32, 32)).save(tmp_path / "bad.png", pnginfo=info)
    assert main(["generate", str(tiny_sd), "--from-png", str(tmp_path / "bad.png"), "--out", str(tmp_path / "o")]) == 2
    assert "its infotext says CFG scale: 'abc', not a number" in capsys.readouterr().err


def test_output_paths_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    for argv in (["generate", "m", "--prompt", "x", "--out", str(tmp_path / "a-file")],
                 ["eval", "m", "--out", str(tmp_path / "a-file")]):
        assert main(argv) == 2
        assert "is a file; give a folder for the output" in capsys.readouterr().err
    assert main(["sample", "m", "--out", str(tmp_path / "grid.txt")]) == 2  # (PIL's error, after the sampling)
    assert "give a .png, .jpg or .webp name" in capsys.readouterr().err


def test_a_model_folder_of_another_kind_given_as_a_controlnet_is_named(tiny_sd, tmp_path, capsys):  # noqa: F811
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "control.png")
    assert main(["generate", str(tiny_sd), "--prompt", "x", "--controlnet", str(tiny_sd / "unet"), "--control-image",
                 str(tmp_path / "control.png"), "--steps", "1", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "holds a UNet2DConditionModel, not a ControlNet or T2I-Adapter" in capsys.readouterr().err  # (meta tensors)


def test_a_file_of_another_kind_given_as_a_model_says_what_it_is(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8)}, tmp_path / "style.safetensors")
    save_file({"emb_params": torch.zeros(1, 768)}, tmp_path / "word.safetensors")
    save_file({"control_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, tmp_path / "canny.safetensors")
    for name, said in (("style", "is a LoRA, not a model: give a base model, and the file with --lora"),
                       ("word", "is a Textual Inversion embedding"), ("canny", "is a ControlNet, not a model")):
        # (each was "an SD 1.5 model whose configs are not cached")
        assert main(["generate", str(tmp_path / f"{name}.safetensors"), "--prompt", "x",
                     "--out", str(tmp_path / "o")]) == 2
        assert said in capsys.readouterr().err, name
    assert main(["sample", str(tmp_path / "style.safetensors"), "--out", str(tmp_path / "g.png")]) == 2
    assert "is a file; difftrain sample draws pixel models" in capsys.readouterr().err


def test_export_settings_that_would_do_nothing_are_refused(tmp_path, capsys):
    assert main(["export", "m", str(tmp_path / "o"), "--min-psnr", "30"]) == 2  # (silently ignored)
    assert "--min-psnr: the int8 quality gate's settings; add --quantize int8" in capsys.readouterr().err
    assert main(["export", "m", str(tmp_path / "o"), "--gate-steps", "3"]) == 2  # (its default hid it)
    assert "--gate-steps: the int8 quality gate's settings" in capsys.readouterr().err
    assert main(["export", "m", str(tmp_path / "o"), "--config", str(tmp_path / "nope")]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["eval", "m", "--weights-dir", str(tmp_path / "nope")]) == 2  # (ignored, then a download tried)
    assert "--weights-dir" in capsys.readouterr().err
    # a mistyped model, named as the argument it is, before the metric networks load (it was the Inception download)
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    assert f"error: {tmp_path / 'nope'} does not exist (check the path" in capsys.readouterr().err  # (was "base:")
    assert main(["eval", str(tmp_path / "nope"), "--out", str(tmp_path / "e")]) == 2
    assert f"error: target: {tmp_path / 'nope'} does not exist (check the path" in capsys.readouterr().err


def test_data_commands_name_their_path_argument_and_report_links_that_lead_nowhere(tmp_path, capsys):
    from PIL import Image

    for argv in (["data", "check", str(tmp_path / "none")], ["data", "build", str(tmp_path / "none"),
                                                              str(tmp_path / "out")]):
        assert main(argv) == 2
        assert f"error: PATH: {tmp_path / 'none'} is not a folder; create it or point PATH at your images" in \
            capsys.readouterr().err  # (it named data.path, a config key these commands do not take)
    # and the options by their flags, in every data command (index and curate named data.path, image_key)
    assert main(["data", "index", str(tmp_path / "none"), "--format", "laion"]) == 2
    assert f"error: PATH: laion filelist {tmp_path / 'none'} does not exist" in capsys.readouterr().err
    (tmp_path / "list.jsonl").write_text('{"url": "a.png"}\n')
    for command in ("build", "curate"):
        assert main(["data", command, "--source", "jsonl", str(tmp_path / "list.jsonl"), str(tmp_path / "out"),
                     "--no-progress"][:None if command == "curate" else -1]) == 2
        assert "needs an 'image' string (the image path); name the key that holds it with --image-key" in \
            capsys.readouterr().err, command
    assert main(["data", "build", "--source", "jsonl", str(tmp_path / "list.jsonl"), str(tmp_path / "out"),
                 "--image-key", "url"]) == 2
    assert capsys.readouterr().err.endswith("no 'caption' key; name the caption's key with --caption-key, or "
                                            "--caption-key '' reads the data without captions\n")
    (tmp_path / "set").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "set" / "a.png")
    (tmp_path / "set" / "b.png").symlink_to(tmp_path / "moved-away.png")
    assert main(["data", "check", str(tmp_path / "set")]) == 0
    out = capsys.readouterr().out
    assert "1 usable images" in out and f"b.png: a link to {tmp_path / 'moved-away.png'}, which does not exist" in out
    # --caption-key '' reads a jsonl without captions, as the message says; a run names its config keys instead
    (tmp_path / "set.jsonl").write_text('{"url": "set/a.png"}\n')
    assert main(["data", "build", "--source", "jsonl", str(tmp_path / "set.jsonl"), str(tmp_path / "built"),
                 "--image-key", "url", "--caption-key", ""]) == 0
    assert "1 records, 1 without caption" in capsys.readouterr().out
    from difftrain.data.folder import DatasetError
    from difftrain.data.sources import open_source

    with pytest.raises(DatasetError, match="name the caption's key with data.caption_key, or data.captions: none "
                                           "reads the data without captions"):
        open_source("jsonl", tmp_path / "set.jsonl", image_key="url", progress=False)


def test_a_bad_config_or_missing_data_is_answered_before_the_trainer_and_torch_are_imported(tmp_path):
    """(Their imports take ~7 s on a 2-core CPU: a mistyped key or data folder was said only after them.) The
    data's refusal is its reader's own."""
    from difftrain.data.sources import open_source

    cases = {"bad.yaml": ("data: {path: data/shapes}\ntraining: {max_step: 10}\n", "training.max_step"),
             "folder.yaml": (f"data: {{path: {tmp_path / 'shapez'}}}\n", ""),
             "jsonl.yaml": (f"data: {{path: {tmp_path / 'x.jsonl'}, source: jsonl, image_key: file}}\n", "")}
    for kind, name in (("folder", "shapez"), ("jsonl", "x.jsonl")):
        with pytest.raises(DifftrainError) as refused:
            open_source(kind, tmp_path / name, image_key="file", progress=False)
        cases[f"{kind}.yaml"] = (cases[f"{kind}.yaml"][0], str(refused.value))
    probe = ("import sys; from difftrain.cli import main; code = main(['train', sys.argv[1]]); "
             "print(code, *(name in sys.modules for name in ('torch', 'difftrain.training.trainer')))")
    for name, (text, said) in cases.items():
        (tmp_path / name).write_text(text)
        ran = subprocess.run([sys.executable, "-c", probe, str(tmp_path / name)], capture_output=True, text=True,
                             timeout=120)
        assert ran.stdout.split() == ["2", "False", "False"], ran.stdout + ran.stderr
        assert said in ran.stderr, (name, ran.stderr)
