"""Sampling schedulers by name, built from the noise schedule a model was trained with.

Each entry is a diffusers scheduler class plus the settings that make it the sampler
users know by that name. `make_scheduler` starts from the model's own scheduler config
(betas, prediction type, timestep count), so a sampler can never disagree with training.
diffusers is imported only when a scheduler is built, so validating a config stays instant.

Names. Every sampler has a short name (`dpm++_2m_karras`) and a display name, which for
A1111's samplers is A1111's own (`DPM++ 2M Karras`); both are accepted, in any case, with
spaces, underscores or hyphens between words. The mapping follows the A1111/k-diffusion
table in diffusers' scheduler docs. Three display names are not A1111 samplers: DDPM,
DPM++ 2S and DEIS (diffusers only).

Not mapped, because diffusers implements no such scheduler (asking for one raises
`UnsupportedScheduler` saying why and what is closest):

- DPM++ 2S a, DPM++ 2S a Karras: k-diffusion's ancestral single-step DPM-Solver++. The
  closest diffusers has is DPMSolverSinglestepScheduler, which is deterministic; it is
  here as `dpm++_2s`, under a name that does not claim to be A1111's.
- DPM fast, DPM adaptive: k-diffusion's fixed-order and adaptive-step DPM-Solver.
- Restart: Restart sampling (Xu et al. 2023).
- DDIM CFG++: CFG++ changes the guidance inside the sampling step, not the schedule.
- A1111 1.9+ schedule types other than Automatic, Uniform, Karras and Exponential
  (SGM Uniform, Simple, Polyexponential, KL Optimal, Align Your Steps, Normal, DDIM, Beta),
  and Karras/Exponential on a sampler whose diffusers class has no such sigmas (Euler a).

DPM++ 2M (and 2M SDE) on the Uniform schedule takes A1111's (k-diffusion's) steps, n from t = 999 to 0,
where diffusers' multistep "linspace" spacing takes n of n + 1 and leaves out t = 0; that is what A1111
gives DPM++ 3M SDE, whose next-to-last sigma it drops, so 3M SDE keeps it.

Same algorithm, not the same pictures: noise comes from a different generator (A1111's
SDE samplers draw Brownian-tree noise, diffusers' multistep SDE draws plain Gaussian
noise), DPM2, DPM2 a and DPM++ 3M SDE Karras keep the next-to-last sigma that A1111 drops, and UniPC keeps
diffusers' defaults (bh2, order 2) where A1111 uses bh1, order 3.

Two samplers need a package difftrain does not install: LMS (scipy) and DPM++ SDE
(torchsde). Without it they raise `MissingSchedulerDependency` naming the package.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import re
from typing import NamedTuple

from difftrain.errors import DifftrainError

_DPM = "DPMSolverMultistepScheduler"
_SDE = {"algorithm_type": "sde-dpmsolver++"}

# display name, diffusers class, settings, schedule types it also comes in.
# The short name is the display name in lower case with underscores, so the two forms
# of one sampler always agree.
_SAMPLERS: list[tuple[str, str, dict, tuple[str, ...]]] = [
    ("DDPM", "DDPMScheduler", {}, ()),
    ("DDIM", "DDIMScheduler", {}, ()),
    ("Euler", "EulerDiscreteScheduler", {}, ("Karras", "Exponential")),
    ("Euler a", "EulerAncestralDiscreteScheduler", {}, ()),
    ("Heun", "HeunDiscreteScheduler", {}, ("Karras", "Exponential")),
    ("DPM++ 2M", _DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2}, ("Karras", "Exponential")),
    ("UniPC", "UniPCMultistepScheduler", {}, ()),
    # CompVis' PLMS is PNDM without its Runge-Kutta warm-up steps.
    ("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, ()),
    ("LMS", "LMSDiscreteScheduler", {}, ("Karras", "Exponential")),
    ("DPM2", "KDPM2DiscreteScheduler", {}, ("Karras", "Exponential")),
    ("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, ("Karras", "Exponential")),
    ("DPM++ 2M SDE", _DPM, {**_SDE, "solver_order": 2}, ("Karras", "Exponential")),
    ("DPM++ 2M SDE Heun", _DPM, {**_SDE, "solver_order": 2, "solver_type": "heun"}, ("Karras", "Exponential")),
    ("DPM++ 3M SDE", _DPM, {**_SDE, "solver_order": 3}, ("Karras", "Exponential")),
    ("DPM++ SDE", "DPMSolverSDEScheduler", {}, ("Karras", "Exponential")),
    # Second order (its default); it reaches sigma 0 only with a first-order last step, which
    # diffusers would otherwise force with a warning.
    ("DPM++ 2S", "DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "lower_order_final": True}, ()),
    ("DEIS", "DEISMultistepScheduler", {}, ()),
    # Meant for LCM-distilled models and LoRAs; on others it is a few-step ancestral sampler.
    ("LCM", "LCMScheduler", {}, ()),
]

_SCHEDULE_SETTINGS = {"Karras": {"use_karras_sigmas": True}, "Exponential": {"use_exponential_sigmas": True}}
_TIMESTEP_SAMPLERS = ("DDIM", "PLMS", "UniPC")  # A1111's sd_samplers_timesteps: no schedule types

# What diffusers does not implement, by A1111 name: why, and what comes closest.
UNSUPPORTED: dict[str, str] = {
    "DPM++ 2S a": "diffusers has no ancestral single-step DPM-Solver++; the closest is dpm++_2s (deterministic)",
    "DPM++ 2S a Karras": "diffusers has no ancestral single-step DPM-Solver++; the closest is dpm++_2s (deterministic)",
    "DPM fast": "diffusers has no fixed-order DPM-Solver (k-diffusion's dpm_fast); the closest is unipc",
    "DPM adaptive": "diffusers has no adaptive-step DPM-Solver (k-diffusion's dpm_adaptive); the closest is dpm++_2m",
    "Restart": "diffusers has no Restart sampler",
    "DDIM CFG++": "CFG++ changes classifier-free guidance inside the step, which a scheduler cannot do; use ddim",
}

# Packages diffusers needs for a scheduler but difftrain does not install.
REQUIRES = {"LMSDiscreteScheduler": "scipy", "DPMSolverSDEScheduler": "torchsde"}

# diffusers raises NotImplementedError mid-sampling for these with prediction_type=sample.
_NO_SAMPLE_PREDICTION = {
    "EulerAncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
    "PNDMScheduler",
}

# A1111 1.9+ "Automatic" schedule type: each sampler's own default (sd_samplers_kdiffusion).
_AUTOMATIC_SCHEDULE = {
    "DPM++ 2M": "Karras",
    "DPM++ SDE": "Karras",
    "DPM++ 2S a": "Karras",
    "DPM2": "Karras",
    "DPM2 a": "Karras",
    "DPM++ 2M SDE": "Exponential",
    "DPM++ 2M SDE Heun": "Exponential",
    "DPM++ 3M SDE": "Exponential",
}


def _short(display: str) -> str:
    return display.lower().replace(" ", "_")


def _build_tables() -> tuple[dict[str, tuple[str, dict]], dict[str, str]]:
    table, displays = {}, {}
    for display, class_name, settings, schedules in _SAMPLERS:
        for schedule in ("", *schedules):
            name = f"{display} {schedule}".strip()
            table[_short(name)] = (class_name, {**settings, **_SCHEDULE_SETTINGS.get(schedule, {})})
            displays[_short(name)] = name
    return table, displays


# short name -> (diffusers class name, settings)
SCHEDULERS: dict[str, tuple[str, dict]]
DISPLAY_NAMES: dict[str, str]  # short name -> display name
SCHEDULERS, DISPLAY_NAMES = _build_tables()


# The eight samplers difftrain started with: no optional package, so a sheet with one row
# each (`sample --scheduler all`) works on any install.
CORE_SCHEDULERS = ("ddpm", "ddim", "euler", "euler_a", "heun", "dpm++_2m", "dpm++_2m_karras", "unipc")


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


_BY_KEY = {_key(display): short for short, display in DISPLAY_NAMES.items()}
_UNSUPPORTED_BY_KEY = {_key(name): (name, why) for name, why in UNSUPPORTED.items()}


# Lowest log-SNR / 2 a sampler starts from: lambda = -5.1 is sigma_max = e^5.1 ~ 164, the
# clip diffusers recommends for the cosine schedule.
LAMBDA_MIN = -5.1


class UnknownScheduler(DifftrainError):
    pass


class UnsupportedScheduler(UnknownScheduler):
    """An A1111 sampler (or sampler + schedule type) that diffusers does not implement."""


class NoStepLeft(DifftrainError):
    """img2img at a strength that leaves the sampler no step to take."""


class MissingSchedulerDependency(DifftrainError):
    pass


class SchedulerRow(NamedTuple):
    display: str  # A1111's name where A1111 has the sampler
    name: str  # short name
    diffusers: str  # class and settings, e.g. DPMSolverMultistepScheduler(use_karras_sigmas=True)


def resolve_name(name: str, schedule_type: str | None = None) -> str:
    """The short name for a short or display name, optionally with A1111 1.9+'s schedule type.

    From 1.9 A1111 writes `Sampler: DPM++ 2M, Schedule type: Karras` where it used to write
    `Sampler: DPM++ 2M Karras`; "Automatic" means the sampler's own default (Karras for
    DPM++ 2M, Exponential for DPM++ 2M SDE), "Uniform" the model's plain timesteps.
    """
    key = _key(name)
    if key in _UNSUPPORTED_BY_KEY:
        display, why = _UNSUPPORTED_BY_KEY[key]
        raise UnsupportedScheduler(f"sampler {display!r} is not available: {why}")
    if key not in _BY_KEY:
        close = difflib.get_close_matches(key, list(_BY_KEY), n=1)
        hint = f" (did you mean {DISPLAY_NAMES[_BY_KEY[close[0]]]!r}?)" if close else ""
        raise UnknownScheduler(
            f"unknown scheduler {name!r}{hint}; choose one of: {', '.join(SCHEDULERS)} "
            "(or their display names, e.g. 'DPM++ 2M Karras', in any case; see --list-schedulers)"
        )
    short = _BY_KEY[key]
    display = DISPLAY_NAMES[short]
    # A schedule in the sampler's own name wins over the schedule type, as in A1111 ("DPM++ 2M Karras", "Karras").
    # Its timestep samplers place their own steps: A1111 records whatever schedule type was selected, and ignores it.
    if schedule_type is None or _key(schedule_type) == "uniform" or display in _TIMESTEP_SAMPLERS or display.endswith(
            tuple(f" {schedule}" for schedule in _SCHEDULE_SETTINGS)):
        return short
    schedule = _key(schedule_type).title()
    if schedule == "Automatic":
        schedule = _AUTOMATIC_SCHEDULE.get(display)
        if schedule is None:
            return short
    if schedule not in _SCHEDULE_SETTINGS:
        raise UnsupportedScheduler(
            f"schedule type {schedule_type!r} is not available: diffusers' schedulers are mapped for "
            "Automatic, Uniform, Karras and Exponential only"
        )
    combined = f"{display} {schedule}"
    if _key(combined) in _UNSUPPORTED_BY_KEY:
        return resolve_name(combined)
    if _key(combined) not in _BY_KEY:
        class_name = SCHEDULERS[short][0]
        raise UnsupportedScheduler(
            f"{display!r} with schedule type {schedule!r} is not available: diffusers' {class_name} "
            f"has no {schedule} sigmas here"
        )
    return _BY_KEY[_key(combined)]


def a1111_sampler(name: str) -> dict[str, str]:
    """A sampler as A1111 1.9+ writes it in an infotext: `Sampler` and `Schedule type` apart. Without a
    schedule type 1.9+ reads "Automatic", Karras for DPM++ 2M: a plain DPM++ 2M must say Uniform."""
    display = display_name(name)
    for schedule in _SCHEDULE_SETTINGS:
        if display.endswith(f" {schedule}"):
            return {"Sampler": display[: -len(schedule) - 1], "Schedule type": schedule}
    return {"Sampler": display, "Schedule type": "Uniform"}


# Samplers that draw noise of their own from the images' generators, which A1111's ENSD re-seeds. A1111's SDE samplers
# draw theirs from a Brownian tree of the seeds, which ENSD leaves alone (diffusers' multistep SDE draws from the
# generators: ENSD is kept from them, so that they too draw what they draw without one).
_GENERATOR_NOISE = ("Euler a", "DPM2 a", "LCM", "DDPM")


def takes_ensd(name: str) -> bool:
    """Whether A1111's eta noise seed delta moves what this sampler draws."""
    return a1111_sampler(name)["Sampler"] in _GENERATOR_NOISE


# A1111's eta: DDIM's (its "Eta DDIM", default 0) reaches diffusers' DDIM step; the ancestral and SDE samplers'
# (its "Eta", default 1) has no setting in diffusers' classes, so only the default draws.
_FIXED_ETA = ("Euler a", "DPM2 a", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DPM++ SDE")


def eta_refusal(name: str, eta: float | None) -> str | None:
    """Why `eta` cannot be drawn with sampler `name`, or None (a sampler without noise of its own ignores it, as
    A1111's do)."""
    if eta is None:
        return None
    if not 0.0 <= eta <= 1.0:
        return f"{eta:g}: from 0 to 1"
    sampler = a1111_sampler(name)["Sampler"]
    if sampler in _FIXED_ETA and eta != 1.0:
        return f"{eta:g} with {sampler}: diffusers' sampler has no eta; it draws A1111's default, 1 (DDIM takes any)"
    return None


def takes_eta(name: str) -> bool:
    """Whether an eta reaches this sampler's steps (DDIM's)."""
    return a1111_sampler(name)["Sampler"] == "DDIM"


def display_name(name: str) -> str:
    """A1111's name for a sampler (what goes after `Sampler:` in an infotext)."""
    return DISPLAY_NAMES[resolve_name(name)]


def _describe(class_name: str, settings: dict) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    return f"{class_name}({args})"


def list_schedulers() -> list[SchedulerRow]:
    """One row per sampler, for `--list-schedulers`."""
    return [
        SchedulerRow(DISPLAY_NAMES[short], short, _describe(class_name, settings))
        for short, (class_name, settings) in SCHEDULERS.items()
    ]


def missing_dependency(name: str) -> str | None:
    """The package a sampler needs that is not installed, or None."""
    import diffusers

    class_name = SCHEDULERS[resolve_name(name)][0]
    # Without an optional backend diffusers exports a placeholder class; asking diffusers
    # (not importlib) keeps this in step with what it will actually load.
    if type(getattr(diffusers, class_name)).__name__ == "DummyObject":
        return REQUIRES.get(class_name, "an optional package")
    return None


def available_schedulers(base_config: dict | None = None) -> list[str]:
    """Short names that can be built here, for this model's prediction type if given."""
    sample = (base_config or {}).get("prediction_type") == "sample"
    return [
        name
        for name, (class_name, _) in SCHEDULERS.items()
        if missing_dependency(name) is None and not (sample and class_name in _NO_SAMPLE_PREDICTION)
    ]


def plain_config(config) -> dict:
    """A scheduler config as a dict in which every value counts as set.

    diffusers lists the keys a loaded config lacked under `_use_default_values`, and `from_config`
    then drops them for the new class's defaults: SD 1.5's PNDM config, which lacks
    `prediction_type` and `timestep_spacing`, would take back an epsilon or a spacing set on top of it.
    """
    return {key: value for key, value in dict(config).items() if key != "_use_default_values"}


def zero_snr_capable(cls: type) -> type:
    """`cls`, or DDIM where `cls` cannot rescale its betas to zero terminal SNR: PNDM (SD 1.5's) keeps the flag
    in its config but samples the unrescaled schedule."""
    if "rescale_betas_zero_snr" in inspect.signature(cls).parameters:
        return cls
    from diffusers import DDIMScheduler

    return DDIMScheduler


def clamped_terminal_betas(base_config: dict) -> list[float] | None:
    """Betas whose cumulative alpha never falls below the sigma_max the samplers can handle.

    Cosine betas end at 0.999, so the last timestep's sigma is ~20,000. Heun's second-order
    correction across that first interval overshoots by orders of magnitude, and Karras
    sigmas spend most of their steps above sigma 1,000 where nothing happens. Capping sigma
    changes nothing a model can see (SNR 4e-5 and 2e-9 are both pure noise). None when the
    schedule never goes that far (linear, scaled_linear).

    The capped tail keeps falling in log-SNR: from the timestep where the schedule's own fall is as steep as a
    straight line down to LAMBDA_MIN at the last timestep, that line (cosine: t = 989 on). A flat cap gave
    cosine's last four timesteps one sigma, and from 287 steps two of a sampler's steps fell on it, where the
    multistep solvers divide by the log-SNR step between them (zero) and every image came out NaN; a line from
    the cap's first timestep (a kink in the step sizes) still threw the third-order solvers off at 1000 steps.
    """
    import diffusers
    import torch

    if base_config.get("rescale_betas_zero_snr"):  # ends at SNR 0 by design; each sampler floors that step itself
        return None
    reference = diffusers.DDPMScheduler.from_config(base_config)  # (make_scheduler passes a plain config)
    alphas_cumprod = reference.alphas_cumprod.double()
    floor = 1.0 / (1.0 + math.exp(-2 * LAMBDA_MIN))
    if float(alphas_cumprod.min()) >= floor:
        return None
    log_snr = 0.5 * torch.log(alphas_cumprod / (1 - alphas_cumprod))  # falls monotonically
    last = len(log_snr) - 1
    first_below = int((alphas_cumprod < floor).nonzero()[0])

    def steeper_than_the_line(t: int) -> bool:  # the schedule's own fall into t against the line from t
        return bool(log_snr[t] - log_snr[t - 1] <= (LAMBDA_MIN - log_snr[t]) / (last - t))

    start = max(first_below - 1, 0)  # back to the tangent from (last, LAMBDA_MIN)
    while start > 1 and steeper_than_the_line(start - 1):
        start -= 1
    tail = torch.linspace(float(log_snr[start]), LAMBDA_MIN, last - start + 1, dtype=torch.float64)[1:]
    capped = torch.cat([alphas_cumprod[:start + 1], torch.sigmoid(2 * tail)])
    previous = torch.cat([torch.ones(1, dtype=torch.float64), capped[:-1]])
    return (1 - capped / previous).tolist()


def scheduler_settings(name: str, base_config: dict) -> tuple[type, dict]:
    import diffusers

    short = resolve_name(name)
    class_name, settings = SCHEDULERS[short]
    if class_name in _NO_SAMPLE_PREDICTION and base_config.get("prediction_type") == "sample":
        raise UnknownScheduler(
            f"{name} cannot sample a model trained with prediction_type=sample (diffusers does not implement it); "
            "use euler, ddpm or dpm++_2m"
        )
    if package := missing_dependency(short):
        # diffusers would hand back a placeholder class that fails later with a longer message.
        raise MissingSchedulerDependency(
            f"{DISPLAY_NAMES[short]} ({class_name}) needs the Python package {package!r}, which is not installed: "
            f"pip install {package}"
        )
    settings = {**settings, **_spacing(class_name, base_config)}
    if class_name != "DDPMScheduler" and (betas := clamped_terminal_betas(base_config)) is not None:
        settings["trained_betas"] = betas
    return getattr(diffusers, class_name), settings


def _spacing(class_name: str, base_config: dict) -> dict:
    """Where a sampler's steps fall, as A1111 places them, whatever spacing the model's config names: its
    k-diffusion samplers from t = 999 down to 0 evenly ("linspace"), DDIM and PLMS on 1000 / steps strides
    from t = 1 ("leading", offset 1). A zero-terminal-SNR model starts at its pure-noise step ("trailing")."""
    if class_name in ("DDPMScheduler", "LCMScheduler"):  # not A1111's; their own config's placement
        return {}
    # A config that says "trailing" means it (zero-terminal-SNR models, SD-Turbo and the few-step distilled
    # models): their first step must be the pure-noise one, as A1111 places it too.
    if base_config.get("rescale_betas_zero_snr") or base_config.get("timestep_spacing") == "trailing":
        return {"timestep_spacing": "trailing"}
    if class_name in ("DDIMScheduler", "PNDMScheduler"):
        # A Stable Diffusion schedule (steps_offset 1 or set_alpha_to_one off, as SD's configs say, whatever their
        # class) ends short of alpha 1, as A1111's DDIM and PLMS do (_place_a1111_timesteps); a pixel model's
        # (DDPM's, offset 0) ends on the clean sample.
        sd_style = base_config.get("steps_offset") == 1 or base_config.get("set_alpha_to_one") is False
        return {"timestep_spacing": "leading", "steps_offset": 1, **({"set_alpha_to_one": False} if sd_style else {})}
    return {"timestep_spacing": "linspace"}


@functools.cache  # one subclass per scheduler class
def _from_first_step(cls: type) -> type:
    """`cls`, counting its steps from the first timestep once they are set.

    Without a begin index diffusers finds the first step by value and, where a timestep repeats (Karras
    sigmas above the schedule's highest, as a zero-terminal-SNR model's are), takes the second occurrence and
    runs off the end. img2img pipelines set their own begin index after set_timesteps, which still wins.
    """
    if not hasattr(cls, "set_begin_index") and cls.__name__ not in _TIMESTEP_CLASSES:  # (these: A1111's steps)
        return cls

    @functools.wraps(cls.set_timesteps)
    def set_timesteps(self, num_inference_steps=None, *args, **kwargs):
        total = self.config.num_train_timesteps
        if num_inference_steps and num_inference_steps > total and cls.__name__ in _DISCRETE_CLASSES:
            raise NoStepLeft(f"{num_inference_steps} steps: diffusers' {cls.__name__} steps over the model's own "
                             f"{total} timesteps; take at most {total}")
        if num_inference_steps and num_inference_steps >= total and _third_order(self):
            raise NoStepLeft(f"{num_inference_steps} steps: diffusers' {cls.__name__} gives NaN when every timestep is "
                             f"a step; take at most {total - 1}")
        if cls.__name__ == "LCMScheduler" and num_inference_steps and "original_inference_steps" not in kwargs:
            # its steps are drawn from a 50-step skipping schedule, and diffusers refuses more (naming a strength
            # no one set); A1111's LCM takes any count: the schedule then has as many points as steps
            kwargs["original_inference_steps"] = max(num_inference_steps, self.config.original_inference_steps)
        # DDIM and PLMS at offset 1: at 1000 steps their first timestep would be 1000, past the schedule's end
        past_end = (num_inference_steps and cls.__name__ in _TIMESTEP_CLASSES
                    and self.config.get("timestep_spacing") == "leading"
                    and total // num_inference_steps * (num_inference_steps - 1) + self.config.steps_offset >= total)
        if past_end:
            offset = self.config.steps_offset
            self.register_to_config(steps_offset=0)
            try:
                return cls.set_timesteps(self, num_inference_steps, *args, **kwargs)
            finally:
                self.register_to_config(steps_offset=offset)
        if num_inference_steps and _uniform_by_timesteps(self) and not args and "timesteps" not in kwargs:
            # diffusers' multistep "linspace" takes n of n + 1 points and drops t = 0: its last step jumped from
            # sigma 0.34 to 0 at 10 steps. A1111's Uniform (k-diffusion's) takes n from t = 999 to 0, as Euler does.
            last = self.config.num_train_timesteps - 1
            kwargs["timesteps"] = [round(last - i * last / max(num_inference_steps - 1, 1))
                                   for i in range(num_inference_steps)]
            cls.set_timesteps(self, None, **kwargs)
            self.set_begin_index(0)
            return
        # diffusers' "linspace" puts a single step at t = 0; A1111's evenly spaced steps start at t = 999.
        single = num_inference_steps == 1 and self.config.get("timestep_spacing") == "linspace"
        if single:
            self.register_to_config(timestep_spacing="trailing")
        try:
            cls.set_timesteps(self, num_inference_steps, *args, **kwargs)
        finally:
            if single:
                self.register_to_config(timestep_spacing="linspace")
        if num_inference_steps and _a1111_timestep_sampler(self):
            _place_a1111_timesteps(self, num_inference_steps)
        if hasattr(self, "set_begin_index"):
            self.set_begin_index(0)

    # Named for what _class_name records (the parent's), found for pickling under a name of its own (in a fresh
    # process through the module's __getattr__).
    name = f"{_SUBCLASS}{cls.__name__}"
    subclass = type(cls.__name__, (cls,), {"set_timesteps": set_timesteps, "__module__": __name__,
                                           "__qualname__": name})
    globals()[name] = subclass
    return subclass


_SUBCLASS = "_FromFirstStep"
# Sigma schedules of their own (Karras, exponential, ...): a custom timestep list is refused with them.
_OWN_SIGMAS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas")


def _diffusers_class(scheduler) -> str:
    """The diffusers class a _from_first_step subclass wraps."""
    return type(scheduler).__mro__[1].__name__


_TIMESTEP_CLASSES = ("DDIMScheduler", "PNDMScheduler")  # A1111's DDIM and PLMS
# Those whose steps are the model's own timesteps, one each at most (diffusers' error, or PLMS's ZeroDivisionError)
_DISCRETE_CLASSES = (*_TIMESTEP_CLASSES, "DDPMScheduler", "LCMScheduler")


def _a1111_timestep_sampler(scheduler) -> bool:
    """DDIM or PLMS on a Stable-Diffusion-style schedule, whose chain ends short of alpha 1 (set_alpha_to_one
    off, as SD's configs say). A pixel model's ends on the clean sample, which A1111's last step (to t = 1)
    would leave a step of noise short of."""
    config = scheduler.config
    return (_diffusers_class(scheduler) in _TIMESTEP_CLASSES and config.get("timestep_spacing") == "leading"
            and config.get("steps_offset") == 1 and config.get("skip_prk_steps", True)
            and not config.get("set_alpha_to_one", True))


def _place_a1111_timesteps(scheduler, count: int) -> None:
    """A1111's (1.6+, sd_samplers_timesteps) DDIM and PLMS steps. On the points T = clip(range(0, 1000, 1000 //
    count) + 1, 0, 999) they step from T[-1] down to T[1], each to the point below, so the last step lands on
    t = 1: 30 steps from t = 991 for 30 asked, but 19 from t = 951 for 20 (1000 // 20 leaves no point past 951).
    diffusers' "leading" took `count` steps from t = 958 (30) down to t = 1 and then to t = 0. The stride a
    step takes, 1000 // count, is the same. Where T's last point is clipped to 999 (3, 9, 27, 36, 37 and 101 or
    more steps) A1111's first DDIM step lands one timestep higher than here, and PLMS keeps diffusers' steps."""
    import numpy as np
    import torch

    total, plms = scheduler.config.num_train_timesteps, _diffusers_class(scheduler) == "PNDMScheduler"
    points = np.arange(0, total, total // count) + scheduler.config.steps_offset
    if len(points) < 2:  # one step: A1111 would take none
        return
    if points[-1] > total - 1:  # clipped
        if plms:
            return  # PNDM's second call steps a stride back up from the point below the top: to 1000, past the end
        points[-1] = total - 1
    if plms:  # its first step also visits the next point
        scheduler._timesteps = points[1:]
        steps = np.concatenate([points[1:-1], points[-2:-1], points[-1:]])[::-1]
    else:
        steps = points[1:][::-1]
    scheduler.timesteps = torch.from_numpy(steps.astype(np.int64).copy()).to(scheduler.timesteps.device)


# A1111's timestep samplers (sd_samplers_timesteps) and the samplers that are not A1111's at all.
_OWN_IMG2IMG = (*_TIMESTEP_CLASSES, "UniPCMultistepScheduler", "DDPMScheduler", "LCMScheduler")


def img2img_steps(scheduler, steps: int, strength: float) -> int:
    """How many of `scheduler`'s timesteps diffusers' img2img runs for `steps` at `strength` (its get_timesteps:
    the tail that int(steps x strength) leaves)."""
    import copy

    scheduler = copy.deepcopy(scheduler)  # (the caller's keeps its own timesteps)
    scheduler.set_timesteps(steps)
    begin = (steps - min(int(steps * strength), steps)) * scheduler.order
    return len(scheduler.timesteps[begin:])


def img2img_strength(scheduler, steps: int, strength: float) -> float:
    """The strength diffusers' img2img is given so that it takes A1111's img2img steps. A1111's k-diffusion samplers
    run int(min(strength, 0.999) x steps) + 1 steps from the schedule's (steps - that)th sigma; diffusers runs
    int(steps x strength), from one point lower. DDIM, PLMS and UniPC, A1111's timestep samplers, run a loop of
    their own (noise put at one timestep, the first step taken at the one below), which diffusers' pipelines do
    not: they keep diffusers' steps, as DDPM and LCM do. Refused where that leaves no step: A1111's DDIM and PLMS
    take one step fewer than asked at many counts (19 for 20), and the tail img2img keeps can then be empty."""
    given = strength
    if type(scheduler).__name__ not in _OWN_IMG2IMG:
        taken = min(steps, int(min(strength, 0.999) * steps) + 1)
        given = min(1.0, (taken + 0.5) / steps)  # (half a step above: float error must not lose one)
    if (left := img2img_steps(scheduler, steps, given)) < 1:
        raise NoStepLeft(f"img2img at {steps} steps and strength {strength} leaves this sampler no step to take "
                         f"({left}); raise the strength or the steps")
    return given


def _third_order(scheduler) -> bool:
    """Multistep solvers of third order (UniPC's corrector makes it one), which divide by zero on the last step
    when every timestep is a step."""
    name = _diffusers_class(scheduler)
    return name in ("UniPCMultistepScheduler", "DEISMultistepScheduler") or (
        name == _DPM and scheduler.config.get("solver_order") == 3)


def _uniform_by_timesteps(scheduler) -> bool:
    """Whether `scheduler` is DPM-Solver++ multistep (A1111's DPM++ 2M, 2M SDE) on its Uniform schedule. Not 3M
    SDE: A1111 drops its next-to-last sigma (t = 0 here), which is what diffusers' own spacing gives."""
    config = scheduler.config
    return (_diffusers_class(scheduler) == _DPM and config.get("timestep_spacing") == "linspace"
            and config.get("solver_order") != 3 and not any(config.get(key) for key in _OWN_SIGMAS))


def __getattr__(name: str):
    if name.startswith(_SUBCLASS):
        import diffusers

        return _from_first_step(getattr(diffusers, name[len(_SUBCLASS):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_scheduler(name: str, base_config: dict):
    base_config = plain_config(base_config)
    cls, settings = scheduler_settings(name, base_config)
    accepted = set(inspect.signature(cls.__init__).parameters)
    if base_config.get("rescale_betas_zero_snr") and zero_snr_capable(cls) is not cls:
        # Building it anyway would sample the unrescaled schedule: a different model than trained.
        raise UnknownScheduler(
            f"{name} ({cls.__name__}) cannot sample a zero-terminal-SNR model; use ddim, euler, euler_a, "
            "dpm++_2m or unipc"
        )
    return _from_first_step(cls).from_config(base_config, **{k: v for k, v in settings.items() if k in accepted})
