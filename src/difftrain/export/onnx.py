"""`difftrain export MODEL OUT --to onnx`: a Stable Diffusion as ONNX graphs that ONNX Runtime runs.

The folder follows the layout diffusers' `OnnxStableDiffusionPipeline` and Hugging Face
Optimum read: `text_encoder/`, `unet/`, `vae_encoder/`, `vae_decoder/` (each `model.onnx`,
with `model.onnx_data` beside it past protobuf's 2 GB), `tokenizer/`, `scheduler/` and
`model_index.json`, plus our manifest (kind `onnx`), so `load_pipeline`, `generate` and
`serve` take it like any model. Inputs and outputs are those of diffusers' conversion
script (int32 `input_ids`; `sample`, `timestep`, `encoder_hidden_states` -> `out_sample`;
`sample` -> `latent_sample`; `latent_sample` -> `sample`) with batch and size axes dynamic;
we add every hidden state of the text encoder (clip skip), the VAE encoder's distribution
(`latent_parameters`, so img2img samples its latent as torch does) and, with a ControlNet,
the UNet's residual inputs.

Exporter: torch's TorchScript-based `torch.onnx.export(dynamo=False)`, the one Optimum and
diffusers' script use; `--exporter dynamo` picks the other. Both gave the tiny UNet's
outputs to 1e-6 when tried once; the dynamo one took far longer to export it (~18 s against
under a second, a one-off measurement, not a benchmark of the repository).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difftrain.atomic import occupied
from difftrain.errors import DifftrainError
from difftrain.models.onnx import PARTS, onnxruntime

log = logging.getLogger(__name__)

OPSET = 17
# torch's dynamo exporter writes opset-18 operators (Split's num_outputs) and cannot convert its Pad down to 17:
# at 17 its graphs failed ONNX's checker and ONNX Runtime's loader.
DYNAMO_OPSET = 18


class ExportError(DifftrainError):
    pass


@dataclass
class ExportOptions:
    precision: str = "fp32"  # fp32 | fp16 (fp16 graphs keep float32 inputs and outputs)
    quantize: str | None = None  # None | int8 (the UNet, static QDQ int8 through ONNX Runtime's quantiser)
    loras: list[tuple[str, float]] = field(default_factory=list)  # merged into the weights at these weights
    lora_scale: float = 1.0  # every LoRA (the model's own and --lora's) merged at weight x this
    embeddings: list[str] = field(default_factory=list)
    controlnet: bool = False  # the UNet takes ControlNet residuals as inputs
    use_ema: bool = True
    config: str | None = None  # single files: the diffusers folder holding their configs
    opset: int | None = None  # None: OPSET, or DYNAMO_OPSET with the dynamo exporter
    exporter: str = "torchscript"  # torchscript | dynamo
    min_psnr: float | None = None  # int8: the quality gate's floor; None: quality.DEFAULT_MIN_PSNR
    force: bool = False  # write an int8 model that fails the gate
    gate_steps: int = 12  # the gate's sampling steps
    gate_size: int | None = None  # the gate's image side (default: generate's, the size the model was trained at)
    gate_clip: str | None = None  # int8: also hold the CLIP score of the gate's images (a folder or hub id)
    max_clip_drop: float | None = None  # its allowed drop in points; None: quality.DEFAULT_MAX_CLIP_DROP

    @property
    def resolved_opset(self) -> int:
        return self.opset or (DYNAMO_OPSET if self.exporter == "dynamo" else OPSET)

    def check(self) -> None:
        if self.precision not in ("fp32", "fp16"):
            raise ExportError(f"--precision {self.precision}: choose fp32 or fp16")
        if self.quantize not in (None, "int8"):
            raise ExportError(f"--quantize {self.quantize}: only int8 is supported")
        if self.quantize and self.precision != "fp32":
            raise ExportError("--quantize int8 starts from the fp32 graphs; drop --precision fp16")
        if self.exporter not in ("torchscript", "dynamo"):
            raise ExportError(f"--exporter {self.exporter}: choose torchscript or dynamo")
        if self.exporter == "dynamo" and self.resolved_opset < DYNAMO_OPSET:
            raise ExportError(f"--opset {self.opset} with --exporter dynamo: it writes opset-{DYNAMO_OPSET} operators; "
                              f"give --opset {DYNAMO_OPSET} or more, or leave --opset out")
        if self.opset is not None and self.opset > _max_opset(self.exporter):
            raise ExportError(f"--opset {self.opset}: torch's {self.exporter} exporter writes opset "
                              f"{_max_opset(self.exporter)} at most")
        if self.gate_size is not None and (self.gate_size < 64 or self.gate_size % 8):
            raise ExportError(f"--gate-size {self.gate_size}: a multiple of 8 px, at least 64")
        if (self.gate_clip or self.max_clip_drop is not None) and not self.quantize:
            raise ExportError("--gate-clip and --max-clip-drop belong to the int8 quality gate: add --quantize int8")
        if self.gate_clip:
            from difftrain.evaluate.clip_score import check_available

            check_available(self.gate_clip)  # before minutes of export, not after


def _max_opset(exporter: str) -> int:
    """The newest opset torch's exporter writes (past it, torch fails after loading the model, with its graph)."""
    from torch.onnx import _constants

    name = "ONNX_MAX_OPSET" if exporter == "dynamo" else "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET"
    return int(getattr(_constants, name, 99))


def export_onnx(source, out, options: ExportOptions | None = None, progress: bool = True) -> Path:
    """Export `source` (anything `load_pipeline` takes) into the folder `out`, written whole or not at all."""
    from difftrain.generate.loader import load_merged, locate, loras_merged

    options = options or ExportOptions()
    options.check()
    onnxruntime()  # refuse early, with the extra to install, not after a minute of exporting
    out = Path(out)
    if occupied(out):
        raise ExportError(f"{out}: exists{' and is not empty' if out.is_dir() else ' as a file'}; choose a new folder")
    # Refused from the manifest, before any weight loads (an ONNX export would build all its sessions first).
    located = locate(source, options.use_ema)
    manifest = located.manifest
    kind = manifest.kind if manifest is not None else None
    merged = loras_merged(located, options.loras)  # (the manifest records them all)
    if options.lora_scale != 1.0 and not merged:
        raise ExportError(f"--lora-scale {options.lora_scale}: scales the LoRAs merged in, and {source} has none of "
                          "its own and no --lora is given")
    if kind == "unconditional":
        raise ExportError(f"{source}: a pixel-space model; ONNX export covers Stable Diffusion models")
    if kind == "onnx":  # traced through ONNX Runtime, every output would be a constant
        raise ExportError(f"{source}: already an ONNX export; export again from the torch model it came from")
    pipe = load_merged(source, options.loras, options.embeddings, use_ema=options.use_ema, config=options.config,
                       lora_scale=options.lora_scale, progress=progress)
    pipe.merged_loras = merged
    if options.quantize and options.gate_size:  # before minutes of export: the ONNX UNet's latents halve evenly
        from difftrain.models.onnx import latent_cell

        cell = pipe.vae_scale_factor * latent_cell(pipe.unet.config)
        if options.gate_size % cell:
            raise ExportError(f"--gate-size {options.gate_size}: a multiple of {cell} px for {source} (its UNet "
                              "halves the latents evenly only at such sizes)")
    if pipe.unet.config.get("time_cond_proj_dim") is not None:
        raise ExportError(f"{source}: its UNet takes a guidance embedding (time_cond_proj_dim, an LCM-distilled "
                          "model), which the exported graph has no input for; draw it with the torch model")
    temporary = out.with_name(f".{out.name}.partial")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        _write_folder(pipe, temporary, options, progress)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)  # a failed or interrupted export leaves nothing behind
        raise
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(temporary, out)
    return out


def _write_folder(pipe, folder: Path, options: ExportOptions, progress: bool) -> None:
    graphs = _graphs(pipe, options.controlnet)
    bar = _bar(len(graphs), progress)
    for part, (module, inputs, names, outputs, axes) in graphs.items():
        bar.set_description(f"exporting {part}")
        _export(module, inputs, folder / part / "model.onnx", names, outputs, axes, options)
        bar.update()
    bar.close()
    _write_configs(pipe, folder, graphs["unet"][0].residual_shapes)
    if options.precision == "fp16":
        for part in PARTS:
            _to_fp16(folder / part / "model.onnx")
    _write_manifest(pipe, folder, options, None)
    if options.quantize == "int8":
        _write_manifest(pipe, folder, options, _quantize_through_gate(folder, options, progress))


def _quantize_through_gate(folder: Path, options: ExportOptions, progress: bool) -> dict:
    """An int8 UNet in `folder`, checked against the fp32 graphs; refused when the gate fails.

    The fp32 reference is a sibling folder holding the fp32 UNet (moved, not copied) and links
    to the other parts: nothing of SD 1.5's 4 GB is copied.
    """
    from difftrain.export.quality import gate_drawer, quality_gate

    reference = folder.with_name(folder.name.replace(".partial", ".fp32"))
    shutil.rmtree(reference, ignore_errors=True)
    reference.mkdir()
    for item in folder.iterdir():
        if item.name == "unet":
            os.replace(item, reference / "unet")
        else:
            (reference / item.name).symlink_to(item.resolve())
    try:
        (folder / "unet").mkdir()
        shutil.copy2(reference / "unet" / "config.json", folder / "unet" / "config.json")
        fp32 = gate_drawer(reference, options.gate_steps, options.gate_size)  # calibrates, then is the gate's reference
        _quantize(reference / "unet" / "model.onnx", folder / "unet" / "model.onnx", fp32)
        gate = quality_gate(fp32, folder, options.min_psnr, options.gate_steps, options.gate_size, progress,
                            options.gate_clip, options.max_clip_drop)
    finally:
        shutil.rmtree(reference, ignore_errors=True)  # removes the links, not what they point to
    if not gate["passed"] and not options.force:
        failed = []
        if gate["psnr_min"] < gate["min_psnr"]:
            failed.append(f"PSNR to fp32 {gate['psnr_min']:.1f} dB at worst (mean {gate['psnr_mean']:.1f}) < "
                          f"{gate['min_psnr']:.1f} dB over {gate['images']} images (lower --min-psnr)")
        if not gate.get("clip_passed", True):
            failed.append(f"CLIP score {gate['clip_score_int8']:.2f} against fp32's {gate['clip_score_fp32']:.2f}, a "
                          f"drop of {gate['clip_drop']:.2f} > {gate['max_clip_drop']:.2f} points (raise --max-clip-drop)")
        raise ExportError(f"int8 fails the quality gate: {'; '.join(failed)}; nothing written. Export fp32 instead, "
                          "or pass --force to write it anyway")
    return gate


class _UNetGraph(torch.nn.Module):
    def __init__(self, unet, residual_shapes: dict[str, tuple[int, int]]):
        super().__init__()
        self.unet, self.residual_shapes = unet, residual_shapes
        # The dynamo exporter maps each named input's dynamic axes onto forward's parameters by name, which
        # *residuals does not have: the instance's forward is given a signature that names each one.
        signature = inspect.signature(type(self).forward)
        named = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in residual_shapes]
        forward = functools.partial(type(self).forward, self)
        forward.__signature__ = signature.replace(parameters=[*list(signature.parameters.values())[1:4], *named])
        self.forward = forward

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        down = list(residuals[:-1]) if residuals else None
        mid = residuals[-1] if residuals else None
        return self.unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]


class _TextEncoderGraph(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        output = self.text_encoder(input_ids=input_ids.long(), output_hidden_states=True)
        return (output.last_hidden_state, output.pooler_output, *output.hidden_states)


class _VaeEncoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        distribution = self.vae.encode(sample).latent_dist
        # The mean first: diffusers' ONNX img2img takes the first output as the latent.
        return distribution.mean, distribution.parameters


class _VaeDecoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def _graphs(pipe, controlnet: bool) -> dict:
    """part -> (module, example inputs, input names, output names, dynamic axes)."""
    unet, vae, text_encoder = pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval()
    size = unet.config.sample_size
    latent = torch.randn(2, unet.config.in_channels, size, size)
    length = pipe.tokenizer.model_max_length
    context = torch.randn(2, length, unet.config.cross_attention_dim)
    residual_shapes = _residual_shapes(unet, latent, context) if controlnet else {}
    residuals = tuple(torch.zeros(2, channels, size // down, size // down) for channels, down in residual_shapes.values())
    image_axes = {0: "batch", 2: "height", 3: "width"}
    unet_axes = {"sample": image_axes, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch", 1: "sequence"},
                 "out_sample": image_axes, **{name: image_axes for name in residual_shapes}}
    layers = text_encoder.config.num_hidden_layers
    hidden = [f"hidden_states.{i}" for i in range(layers + 1)]
    text_axes = {"input_ids": {0: "batch", 1: "sequence"}, "last_hidden_state": {0: "batch", 1: "sequence"},
                 "pooler_output": {0: "batch"}, **{name: {0: "batch", 1: "sequence"} for name in hidden}}
    pixels = size * pipe.vae_scale_factor
    return {
        "text_encoder": (_TextEncoderGraph(text_encoder), (torch.zeros(2, length, dtype=torch.int32),),
                         ["input_ids"], ["last_hidden_state", "pooler_output", *hidden], text_axes),
        "unet": (_UNetGraph(unet, residual_shapes), (latent, torch.tensor([999.0, 999.0]), context, *residuals),
                 ["sample", "timestep", "encoder_hidden_states", *residual_shapes], ["out_sample"], unet_axes),
        "vae_encoder": (_VaeEncoderGraph(vae), (torch.randn(1, 3, pixels, pixels),), ["sample"],
                        ["latent_sample", "latent_parameters"],
                        {"sample": image_axes, "latent_sample": image_axes, "latent_parameters": image_axes}),
        "vae_decoder": (_VaeDecoderGraph(vae), (latent[:1],), ["latent_sample"], ["sample"],
                        {"latent_sample": image_axes, "sample": image_axes}),
    }


def _residual_shapes(unet, latent, context) -> dict[str, tuple[int, int]]:
    """The ControlNet residual inputs: name -> (channels, how many times smaller than the latent)."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet)  # any ControlNet for this UNet gives residuals of these shapes
    with torch.no_grad():
        down, mid = net(latent, torch.tensor([1.0, 1.0]), context,
                        controlnet_cond=torch.zeros(2, 3, latent.shape[2] * 8, latent.shape[3] * 8), return_dict=False)
    shapes = {f"down_block_residual_{i}": (r.shape[1], latent.shape[2] // r.shape[2]) for i, r in enumerate(down)}
    shapes["mid_block_residual"] = (mid.shape[1], latent.shape[2] // mid.shape[2])
    return shapes


def _export(module, inputs, path: Path, names, outputs, axes, options: ExportOptions) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes: the graph is checked below
            torch.onnx.export(module, inputs, str(path), input_names=names, output_names=outputs, dynamic_axes=axes,
                              opset_version=options.resolved_opset, dynamo=options.exporter == "dynamo",
                              do_constant_folding=True)
    except Exception as reason:  # the exporter's own errors name the operator; we name the part
        inner = type(next(module.children())).__name__
        raise ExportError(f"exporting {path.parent.name} ({inner}) to ONNX opset {options.resolved_opset} failed: {type(reason).__name__}: "
                          f"{str(reason).splitlines()[0] if str(reason) else ''}") from None
    _external_data_in_one_file(path)


def _external_data_in_one_file(path: Path) -> None:
    """Past 2 GB the exporter writes one file per tensor; gather them into model.onnx_data as Optimum does."""
    import onnx

    if path.stat().st_size < 2**31 and len(list(path.parent.iterdir())) == 1:
        return
    model = onnx.load(str(path))
    for item in path.parent.iterdir():
        if item != path:
            item.unlink()
    _save(model, path)


def _to_fp16(path: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    # Given the path, it infers shapes with infer_shapes_path: infer_shapes on a loaded model serialises it whole,
    # past protobuf's 2 GB for SD 1.5's fp32 UNet (3.4 GB).
    timestep_path = _timestep_path(path)
    model = convert_float_to_float16(str(path), keep_io_types=True, node_block_list=timestep_path)
    _without_fp16_round_trips(model.graph, timestep_path)
    # The converter appends its Cast nodes at the end; ONNX's checker and TensorRT's parser want the order.
    OnnxModel.graph_topological_sort(model.graph)
    # The fp32 weights file goes: loaded into `model` now, and the fp16 UNet (1.7 GB) is saved inline, which
    # would leave it behind; a model still past 2 GB would be appended to it.
    (path.parent / "model.onnx_data").unlink(missing_ok=True)
    _save(model, path)


def _timestep_path(path: Path) -> list[str]:
    """The nodes from the UNet's `timestep` input to its time embedding's first layer: left in fp32.

    The sinusoidal embedding takes sin and cos of timestep x frequency, up to ~1,000 radians, where
    fp16's spacing is 0.5: computed in fp16 its values were off by up to 0.3 near t = 1,000 (0.14 on
    the tiny test UNet). The Constant nodes feeding the path (the frequencies) stay fp32 with it.
    The path ends at the first layer with weights (a Gemm, MatMul or Conv), found by the graph's
    structure: the dynamo exporter's node names carry no module path.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    reached, path_nodes = {"timestep"}, []
    for node in graph.node:  # ONNX lists nodes in topological order
        if node.op_type not in ("Gemm", "MatMul", "Conv") and reached.intersection(node.input):
            path_nodes.append(node)
            reached.update(node.output)
    if len(path_nodes) > 64 or any(not node.name for node in path_nodes):  # not the small path this expects
        log.warning("%s: the timestep's path to the time embedding was not found (%d nodes); it is converted to "
                    "fp16 with the rest", path, len(path_nodes))
        return []
    inputs = {name for node in path_nodes for name in node.input}
    constants = [n.name for n in graph.node if n.op_type == "Constant" and n.name and inputs.issuperset(n.output)]
    return [n.name for n in path_nodes] + constants


def _without_fp16_round_trips(graph, kept_fp32: list[str]) -> None:
    """Let the fp32 nodes in `kept_fp32` read each other's outputs (and fp32 graph inputs) directly.

    The converter casts every blocked node's output to fp16 and back to fp32 for the next blocked
    node, which rounds the value on its way as if the node were not blocked at all.
    """
    from onnx import AttributeProto, TensorProto

    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for node in graph.node for a in node.attribute):
        return  # control flow reads outer names from inside its bodies, which the rewiring below does not follow
    producer = {output: node for node in graph.node for output in node.output}
    fp32_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}

    def cast_to(name: str) -> int | None:
        """The type a Cast node makes `name` of, None if `name` is not a Cast's output."""
        node = producer.get(name)
        if node is None or node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    def fp32_source(name: str) -> str | None:
        """The fp32 value the fp16 `name` was cast from, if `name` is such a cast."""
        if cast_to(name) != TensorProto.FLOAT16:
            return None
        source = producer[name].input[0]
        return source if source in fp32_inputs or source.endswith("_cast_to_fp16") else None

    blocked = set(kept_fp32)
    for node in graph.node:
        if node.name not in blocked:
            continue
        for i, name in enumerate(node.input):
            if cast_to(name) == TensorProto.FLOAT and (source := fp32_source(producer[name].input[0])) is not None:
                node.input[i] = source
    _drop_unread_casts(graph)


def _drop_unread_casts(graph) -> None:
    """Remove Cast nodes whose output nothing reads any more (until none is left)."""
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        unread = [node for node in graph.node if node.op_type == "Cast" and node.output[0] not in read]
        if not unread:
            return
        for node in unread:
            graph.node.remove(node)


def _quantize(source: Path, target: Path, fp32) -> None:
    """Static int8 (QDQ) of the UNet's Conv, Gemm and weight MatMuls, activations calibrated on real inputs.

    Static rather than dynamic: ONNX Runtime's dynamic int8 turns convolutions into ConvInteger,
    which ran slower than fp32 on this CPU (SD 1.5's shape at 256 px: 0.036 against 0.062
    images/s, measured once with benchmarks/inference_backends.py before the switch; the
    benchmark now runs the static path), while QDQ convolutions run on its int8 kernels (see
    the benchmark's int8 rows). The calibration inputs are what the fp32 graphs' own sampling
    feeds the UNet for prompts that are not the gate's.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static

    feeds = iter(_calibration_feeds(fp32))

    class Feeds(CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    staging = target.parent / ".int8"  # the quantiser's own file layout, gathered into ours by _save
    staging.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(source), str(staging / "model.onnx"), Feeds(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"], calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=(source.parent / "model.onnx_data").exists(),
                        nodes_to_exclude=_attention_core(source))
    _save(onnx.load(str(staging / "model.onnx")), target)
    shutil.rmtree(staging)


def _attention_core(path: Path) -> list[str]:
    """The nodes of attention's softmax(Q K^T) V: the MatMuls of two activations, and the Softmax.

    Left in fp32. The quantiser otherwise puts them between Q/DQ pairs, which ONNX Runtime
    fuses into QLinearMatMul and QLinearSoftmax: at 512 px (4,096 tokens) those took 74 % of
    the int8 UNet's time on this CPU, against 15 % for all the convolutions
    (benchmarks/onnx_unet_ops.py), and they round the attention map itself to 8 bits.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [node.name for node in graph.node
            if node.op_type == "Softmax" or (node.op_type == "MatMul" and node.input[1] not in constants)]


CALIBRATION_PROMPTS = ("a photo of a red house by a lake", "a blue circle and a yellow square, detailed")


def _calibration_feeds(drawer) -> list[dict]:
    """What the fp32 UNet is fed at every step of sampling the calibration prompts (both CFG halves)."""
    unet, feeds = drawer.pipe.unet, []
    run = unet.run

    def recording(names, feed):
        feeds.append({name: value.detach().cpu().numpy().astype(unet.inputs[name]) for name, value in feed.items()})
        return run(names, feed)

    unet.run = recording
    try:
        for seed, prompt in enumerate(CALIBRATION_PROMPTS):
            drawer.draw(prompt, "", [seed])
    finally:
        unet.run = run  # the same drawer draws the gate's reference images next
    return feeds


EXTERNAL_FROM = 2**31 - 2**24  # weights bytes from which a graph keeps them in model.onnx_data (protobuf's 2 GB)


def _save(model, path: Path) -> None:
    import onnx

    # Summed from the tensors: protobuf 7 cannot even measure a message past 2 GB (ByteSize raises
    # EncodeError), and SD 1.5's fp32 UNet, loaded with its weights, is 3.4 GB.
    big = sum(len(tensor.raw_data) for tensor in model.graph.initializer) >= EXTERNAL_FROM
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location="model.onnx_data" if big else None)


def _write_configs(pipe, folder: Path, residual_shapes: dict) -> None:
    from diffusers import __version__ as diffusers_version
    from safetensors.torch import save_file

    from difftrain.sampling.prompts import _final_layer_norm

    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    norm = _final_layer_norm(pipe.text_encoder)
    save_file({name: value.detach().contiguous() for name, value in norm.state_dict().items()},
              folder / "text_encoder" / "final_layer_norm.safetensors")
    unet_config = {**dict(pipe.unet.config), "_class_name": "UNet2DConditionModel"}
    if residual_shapes:
        unet_config["_residual_shapes"] = residual_shapes
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config, indent=2, default=list))
    vae_config = {**dict(pipe.vae.config), "_class_name": "AutoencoderKL"}
    for part in ("vae_encoder", "vae_decoder"):
        (folder / part / "config.json").write_text(json.dumps(vae_config, indent=2, default=list))
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    pipe.scheduler.save_pretrained(folder / "scheduler")
    onnx_model = ["diffusers", "OnnxRuntimeModel"]
    index = {"_class_name": "OnnxStableDiffusionPipeline", "_diffusers_version": diffusers_version,
             "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", type(pipe.scheduler).__name__], "text_encoder": onnx_model,
             "tokenizer": ["transformers", type(pipe.tokenizer).__name__], "unet": onnx_model,
             "vae_decoder": onnx_model, "vae_encoder": onnx_model}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _write_manifest(pipe, folder: Path, options: ExportOptions, gate: dict | None) -> None:
    import onnx

    from difftrain.generate.loader import baked_manifest

    baked_manifest(pipe, "onnx", {
        "format": "onnx", "source": pipe.model_name, "precision": options.precision, "quantize": options.quantize,
        "opset": options.resolved_opset, "exporter": options.exporter, "onnx": onnx.__version__,
        "torch": torch.__version__, "controlnet_inputs": options.controlnet,
        "loras_merged": [[str(path), weight] for path, weight in pipe.merged_loras], "lora_scale": options.lora_scale,
        "quality_gate": gate}).write(folder)


def _bar(total: int, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="part", disable=not progress)
