"""Every sampler name must land on the data, for every noise schedule and prediction type.

The denoiser is exact (see oracle.py), so a failure here is the scheduler's configuration,
not a model's quality: this is what catches solvers that diverge on the cosine schedule.
"""

import re

import pytest
import torch
from oracle import MixtureOracle

from difftrain.config import NoiseConfig
from difftrain.sampling import schedulers
from difftrain.sampling.loop import denoise
from difftrain.sampling.schedulers import (
    CORE_SCHEDULERS,
    DISPLAY_NAMES,
    SCHEDULERS,
    UNSUPPORTED,
    MissingSchedulerDependency,
    UnknownScheduler,
    UnsupportedScheduler,
    available_schedulers,
    display_name,
    list_schedulers,
    make_scheduler,
    missing_dependency,
    resolve_name,
)
from difftrain.training.losses import build_noise_scheduler

MEANS = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
SD_CONFIG = dict(build_noise_scheduler(NoiseConfig(beta_schedule="scaled_linear", prediction_type="epsilon")).config)


def distance_to_data(name: str, beta_schedule: str, prediction_type: str, steps: int = 20, **noise) -> float:
    train_scheduler = build_noise_scheduler(NoiseConfig(beta_schedule=beta_schedule, prediction_type=prediction_type,
                                                        **noise))
    oracle = MixtureOracle(MEANS, train_scheduler.alphas_cumprod, prediction_type, spread=0.1)
    sampler = make_scheduler(name, train_scheduler.config)
    samples = denoise(oracle, sampler, (8, 3, 8, 8), steps, torch.Generator().manual_seed(0))
    rms = ((samples[:, None].double() - MEANS[None].double()) ** 2).flatten(2).mean(-1).sqrt()
    return float(rms.min(dim=1).values.max())  # the worst sample's distance to its nearest mode


def stochastic(name: str) -> bool:
    """Samplers that add fresh noise every step (ancestral, SDE, DDPM, LCM)."""
    class_name, settings = SCHEDULERS[name]
    noisy = {"DDPMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler"}
    noisy |= {"DPMSolverSDEScheduler", "LCMScheduler"}
    return class_name in noisy or settings.get("algorithm_type", "").startswith("sde")


# Samples are N(mode, 0.1^2) ideally, ~0.1 from their mode; a diverged solver is off by
# 0.5 or more (or NaN). Injected noise that a few steps cannot fully remove costs more.
LIMIT = 0.3
DETERMINISTIC_LIMIT = 0.2


@pytest.mark.parametrize("display", DISPLAY_NAMES.values())
def test_every_name_samples_the_sd_schedule(display):
    """By A1111's name, on Stable Diffusion's noise schedule (scaled_linear, epsilon): none diverges."""
    name = resolve_name(display)
    if package := missing_dependency(name):
        with pytest.raises(MissingSchedulerDependency, match=rf"needs the Python package '{package}'.*pip install"):
            make_scheduler(display, SD_CONFIG)
        return
    distance = distance_to_data(display, "scaled_linear", "epsilon")
    limit = LIMIT if stochastic(name) else DETERMINISTIC_LIMIT
    assert distance < limit, f"{display} on scaled_linear/epsilon: worst sample is {distance:.3f} from the data"


CASES = [
    (name, schedule, kind)
    for kind in ("epsilon", "v_prediction", "sample")
    for name in available_schedulers({"prediction_type": kind})
    for schedule in ("linear", "scaled_linear", "cosine")
    if (schedule, kind) != ("scaled_linear", "epsilon")  # the test above
]


@pytest.mark.parametrize("name, beta_schedule, prediction_type", CASES)
def test_every_sampler_lands_on_the_data(name, beta_schedule, prediction_type):
    distance = distance_to_data(name, beta_schedule, prediction_type)
    where = f"{name} on {beta_schedule}/{prediction_type}"
    assert distance < LIMIT, f"{where}: worst sample is {distance:.3f} from the data"


# runwayml/stable-diffusion-v1-5's scheduler/scheduler_config.json
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": None, "clip_sample": False}
ZTSNR = dict(build_noise_scheduler(NoiseConfig(zero_terminal_snr=True, prediction_type="v_prediction")).config)


def _takes_zero_snr(name: str) -> bool:
    try:
        make_scheduler(name, ZTSNR)
        return True
    except UnknownScheduler:
        return False


@pytest.mark.parametrize("name", [name for name in available_schedulers(ZTSNR) if _takes_zero_snr(name)])
def test_zero_terminal_snr_models_sample_from_their_pure_noise_step(name):
    """Every sampler that takes a zero-terminal-SNR model lands on the data: the rescaled betas were once
    clamped and rescaled again (NaN at the end: black images), and Karras sigmas repeated t = 999 and ran off."""
    sampler = make_scheduler(name, ZTSNR)
    sampler.set_timesteps(20)
    if hasattr(sampler, "sigmas") and sampler.sigmas.numel() > 1:
        assert float(sampler.sigmas[0]) > 4000  # the pure-noise step's sigma, 2^12 at the samplers' floor
    else:
        assert int(sampler.timesteps[0]) == 999  # trailing: the first step is the pure-noise one
    distance = distance_to_data(name, "linear", "v_prediction", zero_terminal_snr=True)
    assert distance < LIMIT, f"{name} on a zero-terminal-SNR model: worst sample is {distance:.3f} from the data"


def _a1111_timestep_sampler(kind: str, eps, x: torch.Tensor, alphas_cumprod: torch.Tensor, count: int):
    """A1111 1.6+'s DDIM and PLMS (modules/sd_samplers_timesteps_impl.py, eta 0) restated from their published
    formulas: the points clip(range(0, 1000, 1000 // n) + 1, 0, 999), a step from each to the one below."""
    points = torch.clip(torch.arange(0, 1000, 1000 // count) + 1, 0, 999)
    alphas = alphas_cumprod[points].double()
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(points[:-1], (1, 0))].double()

    def to_prev(e_t, index, x):
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e_t

    old: list[torch.Tensor] = []
    for i in range(len(points) - 1):
        index = len(points) - 1 - i
        e_t = eps(x, int(points[index]))
        if kind == "ddim":
            x = to_prev(e_t, index, x)
            continue
        if not old:  # pseudo improved Euler: the next point's eps too
            e_prime = (e_t + eps(to_prev(e_t, index, x), int(points[max(index - 1, 0)]))) / 2
        elif len(old) == 1:
            e_prime = (3 * e_t - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = to_prev(e_prime, index, x)
        old = (old + [e_t])[-3:]
    return x


@pytest.mark.parametrize("kind", ["ddim", "plms"])
def test_ddim_and_plms_draw_what_a1111s_own_loops_draw(kind):
    """Not only the same timesteps: the same sample, from each step's eps of a toy model, at step counts 1000
    divides (20: 19 steps) and does not (30, 7). diffusers' leading spacing took n steps from t = 958 for 30."""
    def eps(x, t):
        return 0.3 * torch.sin(x * (1 + t / 1000)) + 0.1 * x

    start = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for count in (20, 30, 7):
        sampler = make_scheduler(kind, SD15_SCHEDULER)
        sampler.set_timesteps(count)
        x = start.clone()
        for t in sampler.timesteps:
            x = sampler.step(eps(x, int(t)), t, x).prev_sample
        expected = _a1111_timestep_sampler(kind, eps, start.clone(), sampler.alphas_cumprod, count)
        assert torch.allclose(x, expected, atol=1e-5), (kind, count, float((x - expected).abs().max()))
    # Where A1111 clips its top point to 999 (PLMS stepped past the schedule's end there), and from a base model
    # whose own sampler is another (an Euler config: DDIM's defaults would end the chain at alpha 1).
    for count in (3, 9, 27, 36, 37, 150):
        sampler = make_scheduler(kind, SD15_SCHEDULER)
        sampler.set_timesteps(count)
        x = start.clone()
        for t in sampler.timesteps:
            x = sampler.step(eps(x, int(t)), t, x).prev_sample
        assert torch.isfinite(x).all(), count
    euler_config = {k: v for k, v in SD15_SCHEDULER.items() if k not in ("set_alpha_to_one", "skip_prk_steps")}
    sampler = make_scheduler(kind, {**euler_config, "_class_name": "EulerDiscreteScheduler"})
    sampler.set_timesteps(20)
    assert sampler.timesteps.tolist()[-1] == 51 and len(sampler.timesteps) == 19 + (kind == "plms")


def test_a1111_samplers_start_where_a1111_does_whatever_spacing_the_model_names():
    """k-diffusion samplers from t = 999 (SD's sigma 14.6), DDIM from t = 951 + offset as A1111's 'uniform'
    DDIM; a model whose config says "leading" (as training writes it) gets no other placement."""
    for spacing in ("leading", "linspace"):
        config = {**SD15_SCHEDULER, "timestep_spacing": spacing}
        for name in ("euler", "euler_a", "dpm++_2m", "dpm++_2m_karras", "unipc", "heun"):
            sampler = make_scheduler(name, config)
            sampler.set_timesteps(20)
            assert float(sampler.sigmas[0]) == pytest.approx(14.61, abs=0.01), (name, spacing)
        ddim = make_scheduler("ddim", config)
        ddim.set_timesteps(20)
        assert ddim.timesteps[:3].tolist() == [951, 901, 851], spacing
        # A1111 (1.6+) steps from the top of range(0, 1000, 1000 // n) + 1 down to its second point: 30 from
        # t = 991 for 30 (its last lands on t = 1), 19 from t = 951 for 20.
        ddim.set_timesteps(30)
        assert ddim.timesteps.tolist() == list(range(991, 1, -33)), spacing
        ddim.set_timesteps(20)
        assert ddim.timesteps.tolist() == list(range(951, 1, -50)), spacing
        # DPM++ on the Uniform schedule steps where Euler (and k-diffusion) does: down to t = 0, then sigma 0;
        # diffusers' multistep linspace ended at sigma 0.34 at 10 steps.
        euler, dpm = make_scheduler("euler", config), make_scheduler("dpm++_2m_sde", config)
        euler.set_timesteps(10)
        dpm.set_timesteps(10)
        assert dpm.sigmas.numpy() == pytest.approx(euler.sigmas.numpy(), rel=2e-3), spacing
        assert dpm.timesteps.tolist()[-1] == 0 and len(dpm.timesteps) == 10
    # One step starts at t = 999 too (diffusers' linspace would put it at 0); a config that says trailing (SD-Turbo
    # and other few-step models) keeps it; and the scheduler still pickles.
    import pickle

    for name in ("euler", "euler_a", "dpm++_2m"):
        sampler = make_scheduler(name, SD15_SCHEDULER)
        sampler.set_timesteps(1)
        assert int(sampler.timesteps[0]) == 999 and sampler.config.timestep_spacing == "linspace", name
        assert type(pickle.loads(pickle.dumps(sampler))) is type(sampler)
    import subprocess
    import sys

    loaded = subprocess.run([sys.executable, "-c", "import pickle, sys; s = pickle.loads(sys.stdin.buffer.read()); "
                             "print(type(s).__qualname__, s.timesteps.tolist())"],
                            input=pickle.dumps(sampler), capture_output=True, check=True)  # a fresh process
    assert loaded.stdout.decode().split()[0] == "_FromFirstStepDPMSolverMultistepScheduler"
    turbo = make_scheduler("euler_a", {**SD15_SCHEDULER, "timestep_spacing": "trailing"})
    turbo.set_timesteps(4)
    assert turbo.timesteps.tolist() == [999, 749, 499, 249]


def test_a_loaded_config_keeps_what_it_lacked_once_set_on_top():
    """SD 1.5's PNDM config lacks prediction_type and timestep_spacing; diffusers marks them as defaults and
    from_config used to drop a v_prediction set on top, training epsilon without a word."""
    import json

    from diffusers import PNDMScheduler

    from difftrain.models.noise import noise_scheduler

    loaded = PNDMScheduler.from_config(json.loads(json.dumps(SD15_SCHEDULER)))
    assert set(loaded.config["_use_default_values"]) >= {"prediction_type", "timestep_spacing"}
    trained = noise_scheduler(dict(loaded.config), prediction_type="v_prediction", zero_terminal_snr=True)
    assert trained.config.prediction_type == "v_prediction" and trained.config.timestep_spacing == "trailing"
    assert make_scheduler("euler", dict(trained.config)).config.prediction_type == "v_prediction"


def test_without_the_terminal_clamp_heun_diverges_on_cosine(monkeypatch):
    """The check above can fail: undo the sigma_max clamp and Heun overshoots."""
    monkeypatch.setattr(schedulers, "clamped_terminal_betas", lambda config: None)
    assert distance_to_data("heun", "cosine", "epsilon") > 0.4


def test_ddim_steps_with_the_noise_of_its_clipped_prediction():
    """Guidance pushes a predicted x0 past [-1, 1]. DDIM clips it (clip_sample is on in the
    configs difftrain trains) and must then step with the noise that the clipped x0 implies;
    with diffusers' default, the unclipped one's, x_t leaves the schedule's scale (max 13.5 here)."""
    train_scheduler = build_noise_scheduler(NoiseConfig(beta_schedule="cosine", prediction_type="v_prediction"))
    assert train_scheduler.config.clip_sample
    alphas_cumprod = train_scheduler.alphas_cumprod
    largest_input = []

    def overshooting(x, t):  # the exact v of a predicted x0 of 3 everywhere
        signal, noise = alphas_cumprod[int(t)].sqrt(), (1 - alphas_cumprod[int(t)]).sqrt()
        largest_input.append(float(x.abs().max()))
        return signal * (x - signal * 3.0) / noise - noise * 3.0

    sampler = make_scheduler("ddim", train_scheduler.config)
    samples = denoise(overshooting, sampler, (1, 3, 8, 8), 30, torch.Generator().manual_seed(0))
    assert torch.all(samples == 1.0)
    assert max(largest_input) < 4.0, largest_input  # the starting noise's largest value is 3.5


def test_without_a_begin_index_karras_runs_off_the_schedule(monkeypatch):
    """Repeated timesteps (Karras sigmas on cosine) need the begin index that denoise() sets."""
    import diffusers

    monkeypatch.setattr(schedulers, "clamped_terminal_betas", lambda config: None)
    monkeypatch.setattr(diffusers.DPMSolverMultistepScheduler, "set_begin_index", lambda self, index=0: None)
    with pytest.raises(IndexError):
        distance_to_data("dpm++_2m_karras", "cosine", "epsilon")


DPM = "DPMSolverMultistepScheduler"
SDE = {"algorithm_type": "sde-dpmsolver++"}
# A1111's sampler names and what diffusers' docs map them to.
A1111 = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": (DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": (DPM, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ 2M SDE": (DPM, {**SDE, "solver_order": 2}),
    "DPM++ 2M SDE Karras": (DPM, {**SDE, "solver_order": 2, "use_karras_sigmas": True}),
    "DPM++ 2M SDE Exponential": (DPM, {**SDE, "solver_order": 2, "use_exponential_sigmas": True}),
    "DPM++ 2M SDE Heun": (DPM, {**SDE, "solver_type": "heun"}),
    "DPM++ 2M SDE Heun Karras": (DPM, {**SDE, "solver_type": "heun", "use_karras_sigmas": True}),
    "DPM++ 2M SDE Heun Exponential": (DPM, {**SDE, "solver_type": "heun", "use_exponential_sigmas": True}),
    "DPM++ 3M SDE": (DPM, {**SDE, "solver_order": 3}),
    "DPM++ 3M SDE Karras": (DPM, {**SDE, "solver_order": 3, "use_karras_sigmas": True}),
    "DPM++ 3M SDE Exponential": (DPM, {**SDE, "solver_order": 3, "use_exponential_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}


@pytest.mark.parametrize("a1111_name", A1111)
def test_a1111_names_map_to_the_diffusers_scheduler(a1111_name):
    expected_class, expected = A1111[a1111_name]
    for spelling in (a1111_name, a1111_name.lower(), a1111_name.upper().replace(" ", "_")):
        class_name, settings = SCHEDULERS[resolve_name(spelling)]
        assert class_name == expected_class
        assert expected.items() <= settings.items()
        sigmas = {k for k in settings if k.startswith("use_")}
        assert sigmas == {k for k in expected if k.startswith("use_")}, "only the named sigmas"
    assert display_name(a1111_name) == a1111_name


@pytest.mark.parametrize("name", available_schedulers())
def test_settings_reach_the_built_scheduler(name):
    """make_scheduler drops options a class does not take: none of ours may be dropped."""
    class_name, settings = SCHEDULERS[name]
    scheduler = make_scheduler(name, SD_CONFIG)
    assert type(scheduler).__name__ == class_name
    assert {k: scheduler.config[k] for k in settings} == settings


def test_short_and_display_names_agree():
    for short, display in DISPLAY_NAMES.items():
        assert resolve_name(short) == resolve_name(display) == short
    assert resolve_name("  dpm++-2m   KARRAS ") == "dpm++_2m_karras"
    assert list(SCHEDULERS)[:2] == ["ddpm", "ddim"]
    assert set(CORE_SCHEDULERS) <= set(available_schedulers())


@pytest.mark.parametrize(
    "sampler, schedule_type, name",
    [
        ("DPM++ 2M", "Karras", "dpm++_2m_karras"),
        ("DPM++ 2M", "Automatic", "dpm++_2m_karras"),  # A1111 1.9+: the sampler's own default
        ("DPM++ 2M SDE", "Automatic", "dpm++_2m_sde_exponential"),
        ("DPM++ 3M SDE", "Exponential", "dpm++_3m_sde_exponential"),
        ("DPM2 a", "karras", "dpm2_a_karras"),
        ("Euler a", "Automatic", "euler_a"),
        ("Euler", "Uniform", "euler"),
        ("Euler", "Karras", "euler_karras"),
        ("LMS", None, "lms"),
        ("DPM++ 2M", "Exponential", "dpm++_2m_exponential"),  # 1.9+ combines any sampler with any schedule type
        ("Heun", "Exponential", "heun_exponential"),
        ("DDIM", "Karras", "ddim"),  # A1111 records the dropdown's schedule type and ignores it for these
        ("UniPC", "Karras", "unipc"),
        ("PLMS", "Exponential", "plms"),
    ],
)
def test_a1111_schedule_types(sampler, schedule_type, name):
    assert resolve_name(sampler, schedule_type) == name


@pytest.mark.parametrize(
    "sampler, schedule_type, message",
    [
        ("Euler a", "Karras", "EulerAncestralDiscreteScheduler has no Karras sigmas"),
        ("Euler", "SGM Uniform", "schedule type 'SGM Uniform' is not available"),
        ("DPM++ 2S a", "Automatic", "no ancestral single-step DPM-Solver"),
    ],
)
def test_schedule_types_diffusers_lacks(sampler, schedule_type, message):
    with pytest.raises(UnsupportedScheduler, match=message):
        resolve_name(sampler, schedule_type)


@pytest.mark.parametrize("a1111_name", UNSUPPORTED)
def test_samplers_diffusers_lacks_say_why(a1111_name):
    with pytest.raises(UnsupportedScheduler, match=rf"sampler '{re.escape(a1111_name)}' is not available: \S+"):
        make_scheduler(a1111_name.lower(), SD_CONFIG)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UnknownScheduler, match="choose one of: ddpm, ddim, euler") as error:
        make_scheduler("dpm3", SD_CONFIG)
    assert all(name in str(error.value) for name in SCHEDULERS)
    with pytest.raises(UnknownScheduler, match="did you mean 'Euler a'"):
        make_scheduler("Eular a", SD_CONFIG)


def test_list_schedulers_has_a_row_per_name():
    rows = list_schedulers()
    assert [row.name for row in rows] == list(SCHEDULERS)
    for display, name, diffusers in rows:
        assert resolve_name(display) == name
        assert diffusers.startswith(SCHEDULERS[name][0] + "(")
    assert ("DPM++ 2M SDE Karras", "dpm++_2m_sde_karras") in {(r.display, r.name) for r in rows}
    karras = next(r for r in rows if r.name == "dpm++_2m_sde_karras").diffusers
    assert "algorithm_type='sde-dpmsolver++'" in karras and "use_karras_sigmas=True" in karras


def test_a_missing_package_is_named(monkeypatch):
    import diffusers

    class DummyObject(type):  # what diffusers exports when a scheduler's backend is missing
        pass

    monkeypatch.setattr(diffusers, "EulerDiscreteScheduler", DummyObject("EulerDiscreteScheduler", (), {}))
    monkeypatch.setitem(schedulers.REQUIRES, "EulerDiscreteScheduler", "eulerlib")
    with pytest.raises(MissingSchedulerDependency, match="Euler Karras .* needs the Python package 'eulerlib'"):
        make_scheduler("Euler Karras", SD_CONFIG)
    assert "euler" not in available_schedulers()


REFUSES_SAMPLE = sorted(set(available_schedulers()) - set(available_schedulers({"prediction_type": "sample"})))


def test_samplers_without_sample_prediction_refuse_it_clearly():
    config = build_noise_scheduler(NoiseConfig(prediction_type="sample")).config
    assert "euler_a" in REFUSES_SAMPLE and "dpm2" in REFUSES_SAMPLE and "plms" in REFUSES_SAMPLE
    for name in REFUSES_SAMPLE:
        message = f"{name} cannot sample a model trained with prediction_type=sample"
        with pytest.raises(UnknownScheduler, match=re.escape(message)):
            make_scheduler(name, config)


def test_sampler_keeps_the_models_prediction_type():
    config = build_noise_scheduler(NoiseConfig(prediction_type="v_prediction")).config
    for name in available_schedulers():
        assert make_scheduler(name, config).config.prediction_type == "v_prediction"


def test_long_runs_stay_finite_and_every_step_count_runs_or_is_refused():
    """On cosine, the sigma cap once gave the last four timesteps one sigma: from 287 steps two steps fell on it
    and the multistep solvers divided by their zero log-SNR step (every image black). DDIM and PLMS at 1000
    steps indexed timestep 1000; LCM refused more than 50 steps with diffusers' message about a strength."""
    cosine = dict(build_noise_scheduler(NoiseConfig(beta_schedule="cosine", prediction_type="v_prediction")).config)
    alphas_cumprod = make_scheduler("dpm++_2m", cosine).alphas_cumprod
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    assert torch.all(sigmas[1:] > sigmas[:-1]) and abs(float(sigmas[-1]) - 164.02) < 0.01

    def finite(name, steps, config=cosine):
        zero = denoise(lambda x, t: torch.zeros_like(x), make_scheduler(name, config), (1, 3, 4, 4), steps,
                       torch.Generator().manual_seed(0))
        return bool(torch.isfinite(zero).all())

    assert all(finite(name, 300) for name in ("dpm++_2m", "unipc", "dpm++_2m_sde", "deis"))
    assert finite("ddim", 1000) and finite("plms", 1000, SD_CONFIG) and finite("lcm", 60)
    with pytest.raises(schedulers.NoStepLeft, match="1000 steps: .* gives NaN when every timestep is a step; take at "
                                                    "most 999"):
        finite("unipc", 1000)
    for name in ("ddim", "plms", "lcm"):  # more steps than timesteps: diffusers' ValueError, or a ZeroDivisionError
        with pytest.raises(schedulers.NoStepLeft, match="1001 steps: .* take at most 1000"):
            finite(name, 1001, SD_CONFIG)


def test_dpm_pp_sde_draws_from_the_seed_in_the_sampling_loop():
    """(Its Brownian noise came from a random seed in `difftrain sample`, previews and eval: generate set it.)"""
    pytest.importorskip("torchsde")
    config = dict(build_noise_scheduler(NoiseConfig(beta_schedule="cosine", prediction_type="epsilon")).config)

    def draw(seeds):
        return denoise(lambda x, t: 0.1 * x, make_scheduler("dpm++_sde", config), (len(seeds), 3, 4, 4), 4,
                       [torch.Generator().manual_seed(seed) for seed in seeds])

    pair = draw([3, 4])
    assert torch.equal(pair, draw([3, 4])) and torch.equal(pair[1:], draw([4]))  # the seed's, whatever the batch
