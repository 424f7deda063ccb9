from pathlib import Path

import pytest
import yaml

from difftrain.cli import main
from difftrain.config import ConfigError, load_config, parse_config, resume_conflicts

BASE = {"data": {"path": "images"}}


def errors_of(raw) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, source="run.yaml")
    return str(info.value)


def test_defaults_fill_everything_but_the_data_path():
    config = parse_config(BASE)
    assert config.training.max_steps == 1000
    assert config.noise.beta_schedule is None  # the model's own; linear for a new unconditional UNet
    assert "missing key 'data'" in errors_of({})


def test_unknown_key_names_the_key_suggests_and_lists_allowed():
    message = errors_of({**BASE, "training": {"learning_rat": 1e-4}})
    assert "unknown key 'training.learning_rat'" in message
    assert "did you mean 'learning_rate'?" in message
    assert "max_steps" in message  # the allowed keys are listed


def test_unknown_section_is_rejected():
    assert "unknown key 'trainig'" in errors_of({**BASE, "trainig": {}})


def test_wrong_type_names_key_and_value():
    message = errors_of({**BASE, "training": {"max_steps": "many"}})
    assert "training.max_steps = 'many'" in message
    assert "integer" in message


def test_out_of_range_value_says_the_bound():
    message = errors_of({**BASE, "training": {"learning_rate": -1}})
    assert "training.learning_rate = -1" in message and "greater than 0" in message


def test_choice_lists_allowed_values():
    message = errors_of({**BASE, "noise": {"beta_schedule": "cosin"}})
    assert "noise.beta_schedule = 'cosin'" in message
    assert "'linear', 'scaled_linear' or 'cosine'" in message


def test_resolution_must_divide_by_eight():
    assert "multiple of 8" in errors_of({"data": {"path": "x", "resolution": 30}})


def test_unknown_sampler_lists_names():
    message = errors_of({**BASE, "sample": {"scheduler": "dpm"}})
    assert "sample.scheduler = 'dpm'" in message and "dpm++_2m_karras" in message


def test_overrides_parse_yaml_values_and_validate(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    config = load_config(path, ["training.learning_rate=3e-4", "training.ema.enabled=false", "seed=7"])
    assert config.training.learning_rate == 3e-4
    assert config.training.ema.enabled is False
    assert config.seed == 7
    # YAML 1.1 reads a bare no as false; for mixed_precision it means "no", in a file or a --set.
    assert load_config(path, ["training.mixed_precision=no"]).training.mixed_precision == "no"
    with pytest.raises(ConfigError, match="unknown key 'training.nope'"):
        load_config(path, ["training.nope=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ["training.max_steps"])
    # A value YAML cannot read is named with how to quote it (it was a traceback from the YAML parser)
    with pytest.raises(ConfigError) as refused:
        load_config(path, ["data.path=@foo"])
    assert "--set 'data.path=@foo': the value is not valid YAML" in str(refused.value)
    assert 'quote it, e.g. --set "data.path=\'@foo\'"' in str(refused.value)
    assert load_config(path, ["data.path='@foo'"]).data.path == "@foo"
    with pytest.raises(ConfigError) as refused:  # the advice works for a value with a quote in it too
        load_config(path, ["data.path=@artist's cat"])
    advised = str(refused.value).rsplit("--set ", 1)[1]
    assert advised == '"data.path=\'@artist\'\'s cat\'"'
    assert load_config(path, [advised.strip('"')]).data.path == "@artist's cat"


def test_an_empty_top_level_value_and_a_yes_for_a_number_are_refused_naming_the_key():
    """An empty output_dir, seed or method took its default (`output_dir: $UNSET` trained into runs/run), and a
    yes/no in a number field read as 1 (`checkpoint.keep_last: yes` kept one checkpoint)."""
    assert "output_dir = None" in errors_of({**BASE, "output_dir": None})
    assert "seed = None" in errors_of({**BASE, "seed": None})
    assert "method = None is not a method" in errors_of({**BASE, "method": None})
    assert parse_config({**BASE, "training": None}).training.max_steps > 0  # an empty section still takes defaults
    for section, key in (("training", "batch_size"), ("checkpoint", "keep_last"), ("training", "max_grad_norm")):
        assert f"{section}.{key} = 'true': Input should be a valid" in errors_of({**BASE, section: {key: True}})
    assert "seed = 'false'" in errors_of({**BASE, "seed": False})
    assert parse_config({**BASE, "training": {"ema": {"enabled": True}}}).training.ema.enabled  # yes/no keys stay


def test_missing_and_broken_files_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_resume_conflicts_ignore_safe_keys_and_name_the_rest():
    saved = parse_config(BASE)
    current = parse_config({**BASE, "output_dir": "elsewhere", "training": {"max_steps": 5000}, "sample": {"every_steps": 7}})
    assert resume_conflicts(saved, current) == []
    changed = parse_config({**BASE, "training": {"batch_size": 16}, "noise": {"prediction_type": "v_prediction"}})
    conflicts = resume_conflicts(saved, changed)
    assert any(c.startswith("training.batch_size: checkpoint has") for c in conflicts)
    assert any(c.startswith("noise.prediction_type") for c in conflicts)


def test_resume_accepts_the_old_attention_default_under_auto_and_names_a_real_change():
    before_auto = parse_config({**BASE, "training": {"attention": "sdpa"}})  # what checkpoints before `auto` recorded
    assert resume_conflicts(before_auto, parse_config(BASE)) == []
    classic = parse_config({**BASE, "training": {"attention": "default"}})
    assert resume_conflicts(classic, parse_config(BASE)) == [
        "training.attention: checkpoint has 'default', this config has 'auto'"]


def test_the_compile_scope_conflicts_only_where_a_run_compiles():
    blocks = parse_config({**BASE, "training": {"compile_scope": "blocks"}})
    assert resume_conflicts(parse_config(BASE), blocks) == [
        "training.compile_scope: checkpoint has 'model', this config has 'blocks'"]
    assert resume_conflicts(parse_config(BASE), blocks, compiled=False) == []  # both eager: it decides nothing


def test_cli_config_check(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "training": {"batch_size": 0}}))
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "training.batch_size = 0" in err and "Traceback" not in err
    assert main(["config", "check", str(path), "--set", "training.batch_size=8"]) == 0
    assert "batch_size: 8" in capsys.readouterr().out


RUN_CONFIGS = sorted(str(p) for p in (Path(__file__).parent.parent / "configs").rglob("*.yaml")
                     if "accelerate" not in p.parts)  # configs/accelerate holds launcher configs, not runs


@pytest.mark.parametrize("path", RUN_CONFIGS)
def test_every_shipped_config_is_valid(path):
    load_config(path)


def test_each_method_has_only_its_own_sections():
    with pytest.raises(ConfigError, match="section 'dreambooth' belongs to method dreambooth, and this run's method "
                                          "is text2image"):
        parse_config({"version": 2, "method": "text2image", "data": {"path": "x"}, "model": {"base": "b"},
                      "dreambooth": {"instance_prompt": "sks"}})
    with pytest.raises(ConfigError, match="section 'lora' belongs to method text2image / dreambooth"):
        parse_config({"version": 2, "method": "textual_inversion", "data": {"path": "x"}, "model": {"base": "b"},
                      "textual_inversion": {"token": "<t>", "initializer": "toy"}, "lora": {"enabled": True}})
    config = parse_config({"method": "dreambooth", "data": {"path": "x"}, "model": {"base": "b"},
                           "dreambooth": {"instance_prompt": "sks", "prior_preservation": False}})
    assert type(config).__name__ == "DreamBoothRun" and config.lora.rank == 4 and not hasattr(config, "vae")
    with pytest.raises(ConfigError, match="method = 'text2img' is not a method \\(did you mean 'text2image'\\?\\)"):
        parse_config({"method": "text2img", "data": {"path": "x"}})


def test_a_version_1_config_is_migrated_and_a_newer_one_refused():
    from difftrain.config import CONFIG_VERSION

    # Version 1 wrote every method's section, at its defaults, into every saved config.
    old = {"method": "unconditional", "data": {"path": "x"}, "lora": {"enabled": False, "rank": 4},
           "dreambooth": {"prior_preservation": True}, "vae": {"kl_weight": 1e-6}}
    config = parse_config(old)
    assert config.version == CONFIG_VERSION and "lora" not in config.model_dump()
    # A section that held settings was ignored by version 1; now it is named rather than dropped.
    with pytest.raises(ConfigError, match="section 'lora' belongs to method"):
        parse_config({**old, "lora": {"enabled": True}})
    with pytest.raises(ConfigError, match="config version 7 was written by a newer difftrain; this one reads "
                                          f"versions 1 to {CONFIG_VERSION}"):
        parse_config({"version": 7, "data": {"path": "x"}})


def test_a_rule_across_keys_is_one_plain_line():
    with pytest.raises(ConfigError) as caught:
        parse_config({"version": 2, "method": "unconditional", "data": {"path": "x", "cache": {"latents": True}}})
    assert str(caught.value) == ("config: invalid config\n  data.cache: caching latents/text is for latent methods, "
                                 "not unconditional")


def test_method_rules_that_would_fail_late_or_lose_work_are_refused_at_load(tmp_path):
    sd = {"version": 2, "data": {"path": "x"}, "model": {"base": "m"}}
    # A fully trained text encoder in a LoRA run: lost at the save (a LoRA run writes adapters).
    message = errors_of({**sd, "method": "text2image", "lora": {"enabled": True},
                         "text2image": {"train_text_encoder": True}})
    assert "text2image.train_text_encoder with lora.enabled" in message and "lora.text_encoder: true" in message
    dreambooth = {**sd, "method": "dreambooth", "dreambooth": {"instance_prompt": "a sks dog", "class_prompt": "a dog",
                                                               "class_data": str(tmp_path / "class")}}
    parse_config(dreambooth)
    message = errors_of({**dreambooth, "dreambooth": {**dreambooth["dreambooth"], "class_scheduler": "dpm++2m"}})
    assert "dreambooth.class_scheduler = 'dpm++2m'" in message and "dpm++_2m" in message
    (tmp_path / "class").write_text("not a folder")
    assert "dreambooth.class_data = " in errors_of(dreambooth) and "is a file" in errors_of(dreambooth)
    # (a path inside a file was a NotADirectoryError traceback once the models had loaded)
    inside = {**dreambooth, "dreambooth": {**dreambooth["dreambooth"], "class_data": str(tmp_path / "class" / "c")}}
    assert f"is inside the file {tmp_path / 'class'}; it is the folder class images" in errors_of(inside)
    # Class images written among the instance images (the folder source reads subfolders too) trained as instances.
    for instances, classes in (("inst", "inst"), ("inst", "inst/class"), ("inst/a", "inst")):
        clash = {**dreambooth, "data": {"path": str(tmp_path / instances)},
                 "dreambooth": {**dreambooth["dreambooth"], "class_data": str(tmp_path / classes)}}
        assert "one holds the other, so class images would train as instances" in errors_of(clash), classes
    parse_config({**dreambooth, "data": {"path": str(tmp_path / "inst")},
                  "dreambooth": {**dreambooth["dreambooth"], "class_data": str(tmp_path / "inst-class")}})


@pytest.mark.parametrize("method, section", [("textual_inversion", {"token": "<t>", "initializer": "toy"}),
                                             ("controlnet", {})])
def test_a_frozen_unet_keeps_its_base_noise_settings(method, section):
    run = {"version": 2, "data": {"path": "x"}, "model": {"base": "m"}, "method": method, method: section}
    parse_config(run)
    message = errors_of({**run, "noise": {"prediction_type": "v_prediction", "zero_terminal_snr": True}})
    assert (f"noise.prediction_type, noise.zero_terminal_snr with method {method}: the UNet stays frozen" in message)
    # zero_terminal_snr alone gets the same reason, not the advice to add prediction_type (refused in turn)
    message = errors_of({**run, "noise": {"zero_terminal_snr": True}})
    assert "noise.zero_terminal_snr with method" in message and "v_prediction" not in message, message
    assert "set noise.prediction_type: v_prediction" in errors_of({**BASE, "noise": {"zero_terminal_snr": True}})
    parse_config({**run, "noise": {"snr_gamma": 5.0, "noise_offset": 0.05}})  # the loss's weighting is the run's own


def test_settings_that_crashed_inside_numpy_or_the_lr_schedule_are_refused_at_load():
    assert "seed = -1" in errors_of({**BASE, "seed": -1})
    assert "seed = 4294967296" in errors_of({**BASE, "seed": 2**32})
    polynomial = {"lr_scheduler": "polynomial", "max_steps": 100}
    assert "keep it below max_steps = 100" in errors_of({**BASE, "training": {**polynomial, "lr_warmup_steps": 100}})
    assert "decays to 1e-7" in errors_of({**BASE, "training": {**polynomial, "learning_rate": 1e-8}})
    parse_config({**BASE, "training": {**polynomial, "lr_warmup_steps": 99}, "seed": 2**32 - 1})


def test_schedule_keys_that_would_do_nothing_are_refused_and_the_rest_act():
    import torch

    from difftrain.training.optim import build_lr_schedule

    assert "use constant_with_warmup" in errors_of({**BASE, "training": {"lr_scheduler": "constant",
                                                                         "lr_warmup_steps": 4}})
    assert "lr_num_cycles = 3: applies to lr_scheduler cosine_with_restarts only, and this one is cosine" in errors_of(
        {**BASE, "training": {"lr_scheduler": "cosine", "lr_num_cycles": 3}})
    assert "lr_power = 2.0: applies to lr_scheduler polynomial only" in errors_of(
        {**BASE, "training": {"lr_power": 2}})

    def rates(**training) -> list[float]:
        config = parse_config({**BASE, "training": {"max_steps": 8, "learning_rate": 1.0, **training}})
        schedule = build_lr_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), config.training)
        out = []
        for _ in range(8):
            out.append(round(schedule.get_last_lr()[0], 4))
            schedule.optimizer.step()
            schedule.step()
        return out

    assert rates(lr_scheduler="cosine_with_restarts", lr_num_cycles=2)[4] == 1.0  # the second cycle starts again
    assert rates(lr_scheduler="cosine_with_restarts")[4] < 1.0
    linear, squared = rates(lr_scheduler="polynomial"), rates(lr_scheduler="polynomial", lr_power=2)
    assert squared[4] == pytest.approx(linear[4] ** 2, abs=1e-3)


def test_an_empty_section_takes_its_defaults_and_a_list_item_or_a_list_file_is_named(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("data: {path: images}\ntraining:\n  # max_steps: 10\n")
    assert load_config(tmp_path / "empty.yaml").training.max_steps == 1000
    assert load_config(tmp_path / "empty.yaml", ["training.max_steps=4"]).training.max_steps == 4
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping of sections at the top level, got list"):
        load_config(tmp_path / "list.yaml", ["training.max_steps=3"])
    message = errors_of({"method": "controlnet", "data": {"path": "x"}, "model": {"base": "m"},
                         "controlnet": {"validation": [{"image": "a.png", "prompt": "a circle", "promt": "x"}]}})
    assert ("unknown key 'controlnet.validation.0.promt' (did you mean 'prompt'?); allowed here: image, prompt"
            in message)


def test_a_caption_extension_gets_its_dot_and_an_empty_one_is_refused():
    assert parse_config({"data": {"path": "x", "caption_extension": "caption"}}).data.caption_extension == ".caption"
    assert "'' is no file extension" in errors_of({"data": {"path": "x", "caption_extension": ""}})


def test_a_key_given_twice_and_a_setting_a_method_ignores_are_refused(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("data: {path: x}\ntraining:\n  max_steps: 10\n  max_steps: 20\n")  # the last one won
    with pytest.raises(ConfigError, match="the key 'max_steps' is given twice"):
        load_config(twice)
    assert "output.single_file with method unconditional" in errors_of({**BASE, "output": {"single_file": True}})


def test_lora_settings_without_a_lora_and_a_text_encoder_rate_nothing_uses_are_refused():
    """(A lora section without enabled: true trained the whole UNet at the LoRA's learning rate and wrote a full
    pipeline, without a word; text_encoder_lr with nothing training the text encoder did nothing.)"""
    sd = {"version": 2, "method": "text2image", "data": {"path": "x"}, "model": {"base": "m"}}
    assert ("lora.dropout, lora.rank, lora.text_encoder without lora.enabled: true: the run would fine-tune the "
            "whole UNet") in errors_of({**sd, "lora": {"rank": 8, "dropout": 0.1, "text_encoder": True}})
    parse_config({**sd, "lora": {"enabled": False, "rank": 8}})  # turned off outright (an example's --set)
    parse_config({**sd, "lora": {"rank": 4}})  # the default: nothing would change
    assert "text2image.text_encoder_lr: nothing trains the text encoder" in errors_of(
        {**sd, "text2image": {"text_encoder_lr": 1e-5}})
    parse_config({**sd, "lora": {"enabled": True, "text_encoder": True}, "text2image": {"text_encoder_lr": 1e-5}})
    loaded = parse_config({**sd, "lora": {"enabled": False, "rank": 8}})
    parse_config(yaml.safe_load(loaded.to_yaml()))  # a run's own config.yaml resumes


def test_an_optimizer_or_attention_package_not_installed_is_refused_when_the_config_loads():
    """(bitsandbytes and xformers were found missing only after the model load and the latent cache fill.)"""
    import importlib.util

    sd = {"version": 2, "method": "text2image", "data": {"path": "x"}, "model": {"base": "m"}}
    for key, value, package in (("optimizer", "adamw_8bit", "bitsandbytes"), ("attention", "xformers", "xformers")):
        if importlib.util.find_spec(package) is None:
            assert (f"training.{key} = {value} needs {package}, which is not installed"
                    in errors_of({**sd, "training": {key: value}}))


def test_a_config_json_vae_is_for_method_vae_alone():
    """text2image with model.vae: a .json trained on a random VAE it never trains (exit 0, a useless model)."""
    run = {**BASE, "method": "text2image", "model": {"base": "m", "vae": "vae/config.json"}}
    assert "model.vae = 'vae/config.json': a config .json builds a VAE with random weights" in errors_of(run)
    parse_config({**BASE, "method": "vae", "model": {"vae": "vae/config.json"}})


def test_bucket_and_augment_settings_that_would_do_nothing_are_refused():
    """data.buckets.no_upscale without buckets on left small images enlarged into square crops without a word."""
    assert "data.buckets.no_upscale without data.buckets.enabled: true does nothing" in errors_of(
        {**BASE, "data": {"path": "x", "buckets": {"no_upscale": True}}})
    assert "data.augment.crop_ratio does nothing without data.augment.crop_scale" in errors_of(
        {**BASE, "data": {"path": "x", "augment": {"crop_ratio": [0.5, 2.0]}}})
    assert "data.augment.probability does nothing without an augmentation turned on" in errors_of(
        {**BASE, "data": {"path": "x", "augment": {"probability": 0.5}}})
    # with what they act on, and as a written config.yaml spells the defaults out, they load
    on = parse_config({**BASE, "data": {"path": "x", "resolution": 512,
                                        "buckets": {"enabled": True, "no_upscale": True},
                                        "augment": {"crop_scale": [0.8, 1.0], "crop_ratio": [0.5, 2.0]}}})
    assert on.data.buckets.no_upscale and on.data.augment.crop_ratio == (0.5, 2.0)
    written = yaml.safe_load(parse_config(BASE).to_yaml())
    assert parse_config(written).data.buckets == parse_config(BASE).data.buckets
