import json

import pytest
from diffusers import UNet2DModel

from difftrain.config import ConfigError, parse_config
from difftrain.models.unet import UNET_PRESETS, build_unet


@pytest.mark.parametrize("preset", list(UNET_PRESETS))
def test_presets_build_at_the_data_resolution(preset):
    unet = build_unet(preset, None, 3, resolution=32)
    assert unet.config.sample_size == 32 and unet.config.in_channels == 3


def test_every_preset_is_a_config_choice_and_another_name_is_refused_naming_them(tmp_path):
    base = {"output_dir": str(tmp_path), "data": {"path": str(tmp_path)}}
    for preset in UNET_PRESETS:
        assert parse_config({**base, "model": {"preset": preset}}).model.preset == preset
    with pytest.raises(ConfigError) as refused:
        parse_config({**base, "model": {"preset": "minii"}})
    assert "model.preset = 'minii'" in str(refused.value)
    assert all(f"'{preset}'" in str(refused.value) for preset in UNET_PRESETS)


def test_unet_config_json_overrides_the_preset(tmp_path):
    reference = UNet2DModel(**UNET_PRESETS["tiny"], sample_size=8)
    reference.save_config(tmp_path)  # writes config.json the way diffusers does, with _class_name etc.
    unet = build_unet(None, str(tmp_path / "config.json"), 3, resolution=16)
    assert unet.config.block_out_channels == (16, 32) or list(unet.config.block_out_channels) == [16, 32]
    assert unet.config.sample_size == 16


def test_broken_unet_config_is_a_config_error(tmp_path):
    bad = tmp_path / "unet.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read .* as JSON"):
        build_unet(None, str(bad), 3, resolution=16)
    bad.write_text(json.dumps({"block_out_channels": [16, 32], "down_block_types": ["NoSuchBlock2D"]}))
    with pytest.raises(ConfigError, match="cannot build a UNet2DModel"):
        build_unet(None, str(bad), 3, resolution=16)
