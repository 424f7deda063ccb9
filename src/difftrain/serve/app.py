"""The HTTP side: AUTOMATIC1111's `/sdapi/v1/*` routes, our `/v1/jobs`, authentication and JSON errors.

Every request is answered with JSON, errors included (`{"error", "detail", "field"?}`, never
a traceback). With `--api-auth` or `--token` every route needs credentials, compared in
constant time. Generation requests become jobs on the one queue: the A1111 routes wait for
theirs (and cancel it when the client hangs up); `/v1/jobs` returns an id at once.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# At module level: FastAPI reads the route functions' annotations by name from here.
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from difftrain.serve.engine import Engine, a1111_info
from difftrain.serve.jobs import Job, JobQueue, QueueFull
from difftrain.serve.requests import REQUEST_MAX_PIXELS, ExtrasBatchImagesRequest, ExtrasSingleImageRequest, \
    Img2ImgRequest, Limits, RequestError, Txt2ImgRequest, check_clip_skip, check_ensd, decode_base64, decode_image

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _host_name(url_or_host: str) -> str:
    """The lower-case name in a Host header ("127.0.0.1:7860", "[::1]:7860") or an Origin ("http://localhost")."""
    try:
        return urlsplit(url_or_host if "://" in url_or_host else f"//{url_or_host}").hostname or ""
    except ValueError:  # a malformed IPv6 literal: no name of ours
        return ""


def _field_name(loc) -> str:
    """A pydantic error's location as the field's dotted name ("alwayson_scripts.controlnet.args.0")."""
    return ".".join(str(part) for part in loc if part != "body")


def _refuse_other_sites(request: Request, allowed: set[str]) -> None:
    """A server on loopback answers loopback names (and `allowed`, a proxy's) only. A web page the user opens
    elsewhere can still reach it: through a name of its own that it re-points at 127.0.0.1 (DNS rebinding: the
    Host header gives it away) or by posting across sites (its Origin does), to queue jobs, read results or
    interrupt them."""
    if _host_name(request.headers.get("host", "")) not in allowed:
        raise StarletteHTTPException(421, "this server listens on loopback and answers only 127.0.0.1, localhost "
                                          "or [::1] as its host name (--allow-host NAME for a proxy's)")
    origin = request.headers.get("origin")
    if origin and _host_name(origin) not in allowed:  # ("null": a sandboxed or local page)
        raise StarletteHTTPException(403, f"a request from the web page of {origin} is refused: this server on "
                                          "loopback answers its own page and local clients")


@dataclass
class ServeSettings:
    models: list[str]
    host: str = "127.0.0.1"
    port: int = 7860
    users: list[tuple[str, str]] = field(default_factory=list)  # --api-auth user:pass pairs
    token: str | None = None  # --token: "Authorization: Bearer <token>"
    lora_dir: str | None = "models/lora"
    controlnet_dir: str | None = "models/controlnet"
    embeddings_dir: str | None = "models/embeddings"
    upscaler_dir: str | None = "models/upscalers"
    device: str | None = None
    precision: str = "auto"
    models_in_memory: int = 1  # loaded models kept; the least recently used beyond it is let go
    limits: Limits = field(default_factory=Limits)
    allowed_hosts: list[str] = field(default_factory=list)  # Host names answered on loopback besides its own

    @property
    def protected(self) -> bool:
        return bool(self.users or self.token)


def create_app(settings: ServeSettings, engine: Engine | None = None):
    engine = engine or Engine(settings.models, settings.lora_dir, settings.device, settings.precision,
                              controlnet_dir=settings.controlnet_dir, embeddings_dir=settings.embeddings_dir,
                              models_in_memory=settings.models_in_memory, upscaler_dir=settings.upscaler_dir,
                              limits=settings.limits)
    queue = JobQueue(lambda job, on_step: _run(engine, job, on_step), settings.limits.max_queue)

    allowed = {*LOOPBACK, *(name.lower() for name in settings.allowed_hosts)}

    def authorised(request: Request) -> None:
        if settings.host in LOOPBACK:
            _refuse_other_sites(request, allowed)
        if not settings.protected:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and settings.token and secrets.compare_digest(value.encode(),
                                                                                  settings.token.encode()):
            return
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):  # (binascii.Error is one; non-ASCII text raises a plain one)
                user, password = "", ""
            # Every pair is compared, found or not, so timing tells nothing about which part was wrong.
            matches = [secrets.compare_digest(user.encode(), u.encode()) & secrets.compare_digest(password.encode(),
                       p.encode()) for u, p in settings.users]
            if any(matches):
                return
        raise _Unauthorised()

    @asynccontextmanager
    async def lifespan(app):
        yield
        queue.close()

    app = FastAPI(title="difftrain serve", dependencies=[Depends(authorised)], docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.queue = engine, queue

    # ----------------------------------------------------------------- errors, as JSON
    @app.exception_handler(_Unauthorised)
    async def _unauthorised(request, exc):
        # Browsers (the page) can only answer Basic: offered when there are users to match it.
        headers = {"WWW-Authenticate": 'Basic realm="difftrain"'} if settings.users else {}
        detail = "credentials required (" + " or ".join(
            (["HTTP Basic"] if settings.users else []) + (["Authorization: Bearer"] if settings.token else [])) + ")"
        return JSONResponse({"error": "Unauthorized", "detail": detail}, status_code=401, headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return JSONResponse({"error": "RequestError", "field": exc.field, "detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(QueueFull)
    async def _queue_full(request, exc):
        return JSONResponse({"error": "QueueFull", "detail": str(exc)}, status_code=429, headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = [{"field": _field_name(e["loc"]), "detail": e["msg"]} for e in exc.errors()]
        detail = "; ".join(f"{e['field'] or 'body'}: {e['detail']}" for e in errors)
        return JSONResponse({"error": "ValidationError", "detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        return JSONResponse({"error": "HTTPException", "detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=500)

    app.add_middleware(_BodyLimit, max_bytes=settings.limits.max_body_bytes)

    @app.get("/", response_class=HTMLResponse)
    def page():
        from difftrain.serve.page import page_for

        return page_for(settings.limits)

    # ----------------------------------------------------------------- generation
    async def _wait(request: Request, job: Job) -> dict:
        try:
            while not job.done.is_set():
                if await request.is_disconnected():
                    break
                await asyncio.sleep(0.05)
        finally:
            if not job.done.is_set():  # the client is gone (or the server stops): free the worker at the next step
                queue.cancel(job)
            queue.forget(job)  # answered here: nobody asks for it by id
        if job.failure is not None:
            raise job.failure  # a RequestError names the field; anything else is a 500, as JSON
        if job.state == "cancelled":
            return JSONResponse({"error": "Cancelled", "detail": f"job {job.id} was cancelled"}, status_code=409)
        return job.result or {}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest, request: Request):
        job = await run_in_threadpool(_submit, queue, engine, "txt2img", body, settings.limits)
        return await _wait(request, job)

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgRequest, request: Request):
        job = await run_in_threadpool(_submit, queue, engine, "img2img", body, settings.limits)
        return await _wait(request, job)

    @app.post("/sdapi/v1/extra-single-image")
    def extra_single_image(body: ExtrasSingleImageRequest):
        source = decode_image(body.image, "image", keep_text=True)
        [image], text = engine.upscale(body, [source])
        return {"html_info": _html_info(text), "image": _png_base64(image, {**source.info, "postprocessing": text})}

    @app.post("/sdapi/v1/extra-batch-images")
    def extra_batch_images(body: ExtrasBatchImagesRequest):
        images = body.decoded_images()
        upscaled, text = engine.upscale(body, images)
        return {"html_info": _html_info(text), "images": [_png_base64(image, {**source.info, "postprocessing": text})
                                                          for source, image in zip(images, upscaled)]}

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        job = queue.current  # read once, as above
        state = {"skipped": bool(job and job.skip), "interrupted": bool(job and job.interrupt),
                 # As A1111: job_no is the sampling run drawing now (0-based) of job_count runs (n_iter batches,
                 # each two with the hires fix), sampling_step and sampling_steps that run's.
                 "job": job.id if job else "", "job_count": job.runs if job else 0,
                 "job_timestamp": str(int(job.created)) if job else "0", "job_no": job.run_no if job else 0,
                 "sampling_step": job.run_step if job else 0, "sampling_steps": job.sampling_steps if job else 0}
        return {"progress": job.progress if job else 0.0, "eta_relative": job.eta_relative if job else 0.0,
                "state": state, "current_image": None, "textinfo": None}

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        job = queue.current  # read once: the worker may move on meanwhile
        if job is not None:
            job.interrupt = True
        return {}

    @app.post("/sdapi/v1/skip")
    def skip():
        job = queue.current
        if job is not None:
            job.skip = True
        return {}

    # ----------------------------------------------------------------- our job API
    @app.post("/v1/jobs", status_code=202)
    def submit_job(body: dict):
        kind = body.get("type", "txt2img")
        if kind not in ("txt2img", "img2img"):
            raise RequestError("type", f"{kind!r}: txt2img or img2img")
        model = Img2ImgRequest if kind == "img2img" else Txt2ImgRequest
        try:
            parsed = model.model_validate(body.get("request", {}))
        except ValidationError as reason:
            error = reason.errors()[0]
            field = _field_name(error["loc"])
            raise RequestError(f"request.{field}" if field else "request",
                               f"{field or 'request'}: {error['msg']}") from None
        job = _submit(queue, engine, kind, parsed, settings.limits)
        return _job_view(queue, job)

    @app.get("/v1/jobs/{job_id}")
    def job_status(job_id: str):
        return _job_view(queue, _job(queue, job_id))

    @app.delete("/v1/jobs/{job_id}")
    def cancel_job(job_id: str):
        job = _job(queue, job_id)
        queue.cancel(job)
        return _job_view(queue, job)

    # ----------------------------------------------------------------- models and settings
    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        return [{"title": m.title, "model_name": m.name, "hash": m.hash, "sha256": m.hash, "filename": str(m.spec),
                 "config": None} for m in engine.models.values()]

    @app.get("/sdapi/v1/options")
    def get_options():
        return {"sd_model_checkpoint": engine.current.title, "sd_checkpoint_hash": engine.current.hash,
                "CLIP_stop_at_last_layers": engine.clip_skip or engine.current.own_clip_skip, "samples_format": "png",
                "sd_vae": "Automatic", "eta_noise_seed_delta": engine.ensd}

    @app.post("/sdapi/v1/options")
    def set_options(body: dict):
        clip_skip = body.get("CLIP_stop_at_last_layers")
        check_clip_skip(clip_skip, "CLIP_stop_at_last_layers")
        ensd = body.get("eta_noise_seed_delta")
        check_ensd(ensd, "eta_noise_seed_delta")
        if "sd_model_checkpoint" in body:
            model = engine.find(str(body["sd_model_checkpoint"]))
            engine.load(model)
            engine.current = model
        # For requests that do not set it in override_settings. The current model's own value, as GET options
        # reports it, pins nothing: a client that posts back what it read keeps each model's own.
        if clip_skip is not None and not (engine.clip_skip is None and clip_skip == engine.current.own_clip_skip):
            engine.clip_skip = clip_skip
        if ensd is not None:
            engine.ensd = ensd
        return None  # other keys are A1111 UI settings: accepted, with no effect here

    @app.get("/sdapi/v1/samplers")
    def samplers():
        from difftrain.sampling.schedulers import list_schedulers

        return [{"name": row.display, "aliases": [row.name], "options": {}} for row in list_schedulers()]

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return [{"name": name.lower(), "label": name, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for name in ("Automatic", "Uniform", "Karras", "Exponential")]

    @app.get("/sdapi/v1/loras")
    def loras():
        return [{"name": name, "alias": name, "path": str(path), "metadata": {}}
                for name, path in engine.lora_files().items()]

    @app.get("/sdapi/v1/upscalers")
    def upscalers():
        from difftrain.generate.upscale import IMAGE_UPSCALERS, upscaler_files

        plain = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                 for name in IMAGE_UPSCALERS]
        # (the scale A1111 lists: 4 for its ESRGAN folder's files whatever they hold, 2 for R-ESRGAN 2x+)
        return plain + [{"name": name, "model_name": name, "model_path": str(path), "model_url": None,
                         "scale": 2 if name == "R-ESRGAN 2x+" else 4}
                        for name, path in upscaler_files(engine.upscaler_dir).items()]

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes():
        from difftrain.generate.hires import LATENT_UPSCALERS

        return [{"name": name} for name in LATENT_UPSCALERS]

    @app.get("/controlnet/model_list")
    def controlnet_models():
        from difftrain.serve.control import control_models

        return {"model_list": list(control_models(engine.controlnet_dir))}

    @app.get("/controlnet/module_list")
    def controlnet_modules():
        from difftrain.serve.control import MODULES

        return {"module_list": list(MODULES)}

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae():
        return []  # each model brings its own VAE

    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        model = engine.current
        if model.pipe is None:
            engine.load(model)  # embeddings are loaded with their model
        return model.embeddings

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags():
        return {"api": True, "nowebui": True, "listen": settings.host not in LOOPBACK, "port": settings.port,
                "api_auth": bool(settings.users), "lora_dir": settings.lora_dir}

    @app.get("/sdapi/v1/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/script-info")
    def script_info():
        return []

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        return None  # the served models are the ones given at start

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras():
        return None  # the LoRA folder is read at every request

    @app.post("/sdapi/v1/png-info")
    def png_info(body: dict):
        from difftrain.data.images import BadImage, image_size_from_bytes
        from difftrain.generate.infotext import InfotextError, parse_infotext, read_png_infotext

        data = decode_base64(str(body.get("image", "")), "image")
        try:
            width, height = image_size_from_bytes(data)
        except BadImage:
            width = height = 0  # not an image PIL knows: no infotext, below
        if width * height > REQUEST_MAX_PIXELS:  # reading its text decodes it
            raise RequestError("image", f"{width}x{height} pixels: this server reads at most {REQUEST_MAX_PIXELS:,}")
        try:  # read from the file as sent: decoding to RGB would drop its text (an RGBA or colour-managed PNG)
            text = read_png_infotext(io.BytesIO(data), "image")
        except InfotextError:
            text = ""  # not a PNG, or no infotext: A1111 answers empty too
        if not text:
            return {"info": "", "items": {}, "parameters": {}}
        prompt, negative, params = parse_infotext(text)
        return {"info": text, "items": {},  # A1111 lists the PNG's other text chunks there, not its parameters
                "parameters": {"Prompt": prompt, "Negative prompt": negative, **params}}

    @app.get("/v1/stats")
    def stats():
        return {"queue": {"waiting": queue.waiting(), "running": queue.current is not None},
                "prompt_cache": {"hits": engine.prompt_cache_hits, "misses": engine.prompt_cache_misses,
                                 "entries": len(engine.prompt_cache), "limit": engine.prompt_cache_size}}

    @app.get("/sdapi/v1/memory")
    def memory():
        import torch

        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm") as handle:
            resident = int(handle.read().split()[1]) * page
        cuda = {"error": "not serving on a CUDA device"}
        if engine.device.type == "cuda":  # the serving GPU (--device cuda:1), not the current one; none on a CPU
            device = engine.device
            free, total = torch.cuda.mem_get_info(device)
            cuda = {"system": {"free": free, "used": total - free, "total": total},
                    "active": {"current": torch.cuda.memory_allocated(device),
                               "peak": torch.cuda.max_memory_allocated(device)}}
        return {"ram": {"total": pages * page, "used": resident}, "cuda": cuda}

    return app


class _Unauthorised(Exception):
    pass


class _BodyLimit:
    """Bodies with a Content-Length within the limit only; as plain ASGI, so the app still sees a client hang up
    (Starlette's BaseHTTPMiddleware, behind @app.middleware, hides the disconnect from request.is_disconnected)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
            length = headers.get("content-length")
            refusal = None
            # A chunked body (with or without a Content-Length beside it) could be any size: refused.
            if headers.get("transfer-encoding"):
                refusal = JSONResponse({"error": "LengthRequired", "detail": "send the body with a Content-Length, "
                                        "not chunked"}, status_code=411)
            elif length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                refusal = JSONResponse({"error": "PayloadTooLarge", "detail": f"body of {length} bytes; this server "
                                        f"takes at most {self.max_bytes}"}, status_code=413)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BackgroundServer:
    """The server in a thread of this process, on a free loopback port if none is set: for tests,
    benchmarks and notebooks. `url` is its address; `stop()` shuts it down."""

    def __init__(self, settings: ServeSettings, engine: Engine | None = None, timeout: float = 60):
        import socket
        import threading
        import time

        import uvicorn

        if not settings.port or settings.port == 7860:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                settings.port = probe.getsockname()[1]
        self.app = create_app(settings, engine)
        self.url = f"http://{settings.host}:{settings.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=settings.host, port=settings.port,
                                                    log_level="error", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started and self.thread.is_alive() and time.time() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError(f"the server did not start on {self.url}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _submit(queue: JobQueue, engine: Engine, kind: str, body: Txt2ImgRequest, limits: Limits) -> Job:
    """Checked and queued. The model is fixed now: a later switch (POST options) changes later jobs only."""
    body.check(limits)
    prepared = engine.precheck(body)  # a bad sampler, LoRA or model name is refused before it waits in the queue
    return queue.submit(Job(kind, body, prepared=prepared))


def _job(queue: JobQueue, job_id: str) -> Job:
    job = queue.get(job_id)
    if job is None:
        raise RequestError("job", f"no job {job_id} (finished jobs are kept for a while, then forgotten)", 404)
    return job


def _job_view(queue: JobQueue, job: Job) -> dict:
    return {"id": job.id, "type": job.kind, "state": job.state, "progress": job.progress,
            "eta_relative": job.eta_relative, "queue_position": queue.position(job), "result": job.result,
            "error": job.error}


def _png_base64(image, texts: dict[str, str]) -> str:
    """A PNG, base64, carrying `texts` as text chunks."""
    from difftrain.generate.infotext import png_bytes

    return base64.b64encode(png_bytes(image, texts)).decode()


def _html_info(text: str) -> str:
    """A1111's plaintext_to_html of the postprocessing text."""
    import html

    return f"<p>{html.escape(text)}</p>"


def _run(engine: Engine, job: Job, on_step) -> dict:
    """A job drawn: A1111's response body (images base64 PNG with their infotext)."""
    from difftrain.generate.infotext import png_bytes

    request = job.request
    drawn = engine.draw(request, on_step, job.prepared)
    images = [base64.b64encode(png_bytes(image, text)).decode() for image, text in zip(drawn.images, drawn.infotexts)]
    parameters = request.model_dump()
    if job.kind == "img2img" and not request.include_init_images:  # A1111 sets them to None, keeping the keys
        parameters.update(init_images=None, mask=None)
    return {"images": images if request.send_images else [], "parameters": parameters,
            "info": a1111_info(request, drawn)}
