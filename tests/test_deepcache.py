"""`generate --deepcache N`: the UNet's deep features reused between whole-UNet steps."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from test_text2image import tiny_sd  # noqa: F401

from difftrain.cli import main
from difftrain.generate.infotext import parse_infotext, read_png_infotext


def test_the_shallow_path_on_fresh_deep_features_is_the_whole_unet(tiny_sd):  # noqa: F811
    from diffusers import UNet2DConditionModel

    from difftrain.generate.deepcache import DeepCache

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    cache = DeepCache(unet, interval=2)
    torch.manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        whole = unet(x, 500, context).sample  # a whole step: keeps what enters the last up block
        shallow = unet(x, 500, context).sample  # the next call skips the deep blocks, on those features
    assert cache.full_calls == 1 and cache.calls == 2
    # The same inputs, so the kept features are exactly what the deep blocks would give: the same output.
    assert torch.allclose(whole, shallow, atol=1e-5), (whole - shallow).abs().max()


def test_the_cache_survives_the_offload_hook_being_put_back_after_each_generation(tiny_sd):  # noqa: F811
    """--cpu-offload: after every pipeline call diffusers removes accelerate's hook (restoring the forward it
    wrapped) and adds it again. Done here with accelerate's own hook functions, as on a GPU."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
    from diffusers import UNet2DConditionModel

    from difftrain.generate.deepcache import DeepCache

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    add_hook_to_module(unet, ModelHook())
    cache = DeepCache(unet, interval=2)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        for generation in range(2):
            cache.reset()
            for _ in range(4):
                unet(x, 500, context)
            remove_hook_from_module(unet)  # what maybe_free_model_hooks does at the end of a call
            add_hook_to_module(unet, ModelHook())
    # The second generation's 4 calls went through the cache too (2 whole ones in each generation). Without
    # the re-wrap they never reached it: 0 calls, and every step ran the whole UNet.
    assert (cache.calls, cache.full_calls) == (4, 4)
    assert hasattr(unet, "_hf_hook")  # the offload hook is still in place, under the cache


def generate(model, out, *extra):
    assert main(["generate", str(model), "--prompt", "a red circle", "--steps", "6", "--seed", "5",
                 "--out", str(out), "--no-progress", *extra]) == 0
    return sorted(out.glob("*.png"))[-1]


def test_deepcache_changes_little_is_recorded_and_repeats_from_the_png(tiny_sd, tmp_path, capsys):  # noqa: F811
    plain = generate(tiny_sd, tmp_path / "plain")
    every = generate(tiny_sd, tmp_path / "every", "--deepcache", "1")  # 1: every step whole, the plain image
    cached = generate(tiny_sd, tmp_path / "cached", "--deepcache", "3")
    pixels = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (plain, every, cached)]
    assert np.array_equal(pixels[0], pixels[1])
    difference = np.abs(pixels[0] - pixels[2])
    assert 0 < difference.mean() < 20, difference.mean()  # not the same image, but close to it
    prompt, negative, params = parse_infotext(read_png_infotext(cached))
    assert params["DeepCache"] == "3"
    assert main(["generate", str(tiny_sd), "--from-png", str(cached), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    again = np.asarray(Image.open(sorted((tmp_path / "again").glob("*.png"))[0]).convert("RGB"), dtype=np.float64)
    assert np.array_equal(again, pixels[2])
    capsys.readouterr()
    assert main(["generate", str(tiny_sd), "--prompt", "x", "--deepcache", "3", "--compile", "--out",
                 str(tmp_path / "no"), "--no-progress"]) == 2
    assert "--deepcache skips the UNet's deep blocks inside --compile's graph" in capsys.readouterr().err
    # With a ControlNet it is refused before anything loads (the ControlNet path does not even exist).
    assert main(["generate", str(tiny_sd), "--prompt", "x", "--deepcache", "3", "--controlnet", str(tmp_path / "cn"),
                 "--control-image", str(tmp_path / "mask.png"), "--out", str(tmp_path / "no"), "--no-progress"]) == 2
    assert "where a ControlNet's residuals go" in capsys.readouterr().err


def test_a_prompt_edit_or_alternation_gets_a_whole_unet_step_when_its_text_changes(tiny_sd):  # noqa: F811
    """Deep features kept from one span's conditioning are not the next's: where the text changes the UNet runs
    whole, so [red|blue] at interval 3 over 6 steps is whole at every call from the third (it changes at each)."""
    from difftrain.generate.text2image import Drawer, GenerateOptions

    def whole_calls(prompt: str) -> int:
        drawer = Drawer(str(tiny_sd), GenerateOptions(prompt="", steps=6, width=32, height=32, deepcache=3),
                        progress=False)
        drawer.draw(prompt, "", [5])
        return drawer.deepcache.full_calls

    assert whole_calls("a red circle") == 2  # calls 0 and 3
    assert whole_calls("a [red:blue:3] circle") == 3  # blue from call 4: 0, 3 and 4
    assert whole_calls("a [red|blue] circle") == 5  # 0, then every change: 2, 3, 4, 5
    assert whole_calls("a red circle AND a blue square") == 2  # AND alone changes nothing from step to step
