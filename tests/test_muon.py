"""training.optimizer: muon: the orthogonalisation, which tensors it takes, the AdamW half, resume and refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import UNet2DModel

from difftrain.cli import main
from difftrain.config import ConfigError, parse_config
from difftrain.training.muon import MuonWithAdamW, orthogonalize, split_for_muon
from test_text2image import tiny_sd  # noqa: F401  (a fixture)


def test_orthogonalize_keeps_the_singular_vectors_and_evens_out_the_values():
    torch.manual_seed(0)
    for rows, columns in [(64, 288), (288, 64), (32, 32)]:  # a 3x3 kernel of 32 channels flattened, its transpose
        # singular values spread 30 to 1: five iterations cannot lift values below ~1/500 of the Frobenius
        # norm to 0.5 (the slope at zero is 3.4), which is Muon as published
        rank = min(rows, columns)
        u, _ = torch.linalg.qr(torch.randn(rows, rank))
        v, _ = torch.linalg.qr(torch.randn(columns, rank))
        matrix = u @ torch.diag(torch.logspace(1.5, 0, rank)) @ v.T
        ortho = orthogonalize([matrix])[0]
        values = torch.linalg.svdvals(ortho)
        assert values.min() > 0.5 and values.max() < 1.5, (rows, columns, values.min(), values.max())
        in_basis = u.T @ ortho @ v  # diagonal when ortho = U S' V^T
        off = in_basis - torch.diag(torch.diagonal(in_basis))
        assert off.abs().max() < 1e-4 * in_basis.abs().max(), (rows, columns)


def test_the_iteration_on_gram_matrices_equals_the_iteration_on_the_matrices():
    """Muon's published iteration, X <- a X + (b G + c G^2) X with G = X X^T, on each matrix alone, against ours
    (the Gram matrices of one size batched together, tall matrices transposed)."""
    torch.manual_seed(0)
    matrices = [torch.randn(shape) for shape in [(16, 72), (16, 72), (16, 40), (72, 16), (32, 32), (8, 8)]]

    def published(matrix):
        x = matrix.mT if matrix.size(0) > matrix.size(1) else matrix
        x = x / x.norm()
        for _ in range(5):
            gram = x @ x.mT
            x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
        return x.mT if matrix.size(0) > matrix.size(1) else x

    for ours, expected in zip(orthogonalize(matrices), map(published, matrices)):
        assert ours.shape == expected.shape and torch.allclose(ours, expected, atol=1e-4), ours.shape


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=5)


def test_split_gives_hidden_matrices_to_muon_and_the_edges_norms_biases_and_embeddings_to_adamw():
    unet = _tiny_unet()
    groups = split_for_muon([{"params": list(unet.parameters()), "lr": 0.5}], {"unet": unet})
    assert [g["muon"] for g in groups] == [True, False] and all(g["lr"] == 0.5 for g in groups)
    name_of = {id(p): n for n, p in unet.named_parameters()}
    muon = {name_of[id(p)] for p in groups[0]["params"]}
    adamw = {name_of[id(p)] for p in groups[1]["params"]}
    assert muon.isdisjoint(adamw) and muon | adamw == set(name_of.values())
    assert {"conv_in.weight", "conv_out.weight", "class_embedding.weight"} <= adamw
    assert "down_blocks.0.resnets.0.conv1.weight" in muon and "time_embedding.linear_1.weight" in muon
    assert "down_blocks.1.attentions.0.to_q.weight" in muon
    assert all(unet.get_parameter(n).ndim == 1 for n in adamw - {"conv_in.weight", "conv_out.weight",
                                                                "class_embedding.weight"})


def test_a_vaes_input_and_output_layers_inside_its_encoder_and_decoder_stay_with_adamw():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2)
    groups = split_for_muon([{"params": list(vae.parameters())}], {"vae": vae})
    adamw = {id(p) for p in groups[1]["params"]}
    edges = [p for name, p in vae.named_parameters() if name.split(".")[1] in ("conv_in", "conv_out")]
    assert len(edges) == 8 and all(id(p) in adamw for p in edges)
    assert id(vae.encoder.down_blocks[0].resnets[0].conv1.weight) not in adamw


def _with_gradients(unet: UNet2DModel, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in unet.parameters():
        p.grad = torch.randn(p.shape, generator=generator)


def test_the_adamw_half_is_torchs_fused_adamw_bit_for_bit():
    ours_unet, torchs_unet = _tiny_unet(), _tiny_unet()
    settings = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    ours = MuonWithAdamW(split_for_muon([{"params": list(ours_unet.parameters())}], {"unet": ours_unet}), **settings)
    rest = set(map(id, ours.param_groups[1]["params"]))
    torchs = torch.optim.AdamW([p for p, q in zip(torchs_unet.parameters(), ours_unet.parameters()) if id(q) in rest],
                               fused=True, **settings)
    for step in range(3):
        _with_gradients(ours_unet, step), _with_gradients(torchs_unet, step)
        ours.step(), torchs.step()
    for (name, p), q in zip(ours_unet.named_parameters(), torchs_unet.parameters()):
        if id(p) in rest:
            assert torch.equal(p, q), name


def test_the_muon_half_matches_torchs_muon_on_a_matrix_and_flattens_a_conv_kernel():
    """torch.optim.Muon (2-D only, Newton-Schulz in bf16) is the reference: ours, in fp32, agrees to bf16's
    precision."""
    torch.manual_seed(0)
    matrix = torch.nn.Parameter(torch.randn(48, 96) * 0.1)
    reference = torch.nn.Parameter(matrix.detach().clone())
    ours = MuonWithAdamW([{"params": [matrix], "muon": True}], lr=0.02, betas=(0.9, 0.999), eps=1e-8,
                         weight_decay=0.1)
    torchs = torch.optim.Muon([reference], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                              adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        matrix.grad = torch.randn(matrix.shape, generator=torch.Generator().manual_seed(step))
        reference.grad = matrix.grad.clone()
        before, before_reference = matrix.detach().clone(), reference.detach().clone()
        ours.step(), torchs.step()
        moved, moved_reference = matrix.detach() - before, reference.detach() - before_reference
        assert (moved - moved_reference).norm() < 0.02 * moved_reference.norm(), step
    # A conv kernel takes the step of its (out, in * kh * kw) matrix.
    kernel = torch.nn.Parameter(torch.randn(16, 8, 3, 3))
    kernel.grad = torch.randn(kernel.shape)
    before = kernel.detach().clone()
    MuonWithAdamW([{"params": [kernel], "muon": True}], lr=0.01, betas=(0.9, 0.999), eps=1e-8,
                  weight_decay=0.0).step()
    expected = orthogonalize([(kernel.grad * 1.95).reshape(16, 72)])[0] * 0.01 * 0.2 * math.sqrt(72)
    assert torch.allclose(before - kernel.detach(), expected.view(16, 8, 3, 3), atol=1e-6)


def test_a_demo_run_with_muon_resumes_bitwise(make_config, tmp_path):
    from test_train_e2e import assert_same_checkpoint

    training = {"optimizer": "muon", "weight_decay": 0.01}
    straight = make_config("straight", training={**training, "max_steps": 4}, checkpoint={"every_steps": 2})
    assert main(["train", str(straight), "--no-progress"]) == 0
    halves = make_config("halves", training={**training, "max_steps": 2}, checkpoint={"every_steps": 2})
    assert main(["train", str(halves), "--no-progress"]) == 0
    assert main(["train", str(halves), "--no-progress", "--set", "training.max_steps=4", "--resume", "latest"]) == 0
    assert_same_checkpoint(tmp_path / "straight/checkpoints/step-00000004",
                           tmp_path / "halves/checkpoints/step-00000004")
    # and the run trained with it: a Muon momentum buffer per hidden matrix sits in the optimizer file
    from safetensors.torch import load_file

    slots = {key.split(".", 1)[1] for key in load_file(str(tmp_path / "straight/checkpoints/step-00000004/"
                                                             "optimizer.safetensors"))}
    assert slots == {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"}


@pytest.mark.parametrize("method, section", [("text2image", {"lora": {"enabled": True}}),
                                              ("textual_inversion", {"textual_inversion": {"token": "<x>",
                                                                                           "initializer": "cat"}})])
def test_muon_is_refused_for_a_lora_or_an_embedding(method, section):
    raw = {"method": method, "model": {"base": "some/model"}, "data": {"path": "data"},
           "training": {"optimizer": "muon"}, **section}
    with pytest.raises(ConfigError, match="training.optimizer = muon is for a model's own weight matrices.*"
                                          "set training.optimizer: adamw"):
        parse_config(raw)


def test_muon_is_refused_under_fsdp_before_any_model_loads(make_config, monkeypatch):
    import yaml

    from difftrain.training import sharding
    from difftrain.training.trainer import Trainer

    monkeypatch.setattr(sharding, "is_sharded", lambda accelerator: True)  # as under an FSDP launch
    config = parse_config(yaml.safe_load(make_config(training={"optimizer": "muon"}).read_text()))
    with pytest.raises(ConfigError, match="muon orthogonalises each weight matrix whole, and this launch splits them "
                                          r"\(FSDP\).*configs/accelerate/ddp.yaml"):
        Trainer(config, progress=False)


def test_a_text2image_run_trains_the_unet_and_text_encoder_with_muon(tiny_sd, shapes_dir, tmp_path):  # noqa: F811
    """UNet2DConditionModel and CLIP through the same split: their matrices move by Muon's step, the token and
    position embeddings (nn.Embedding) keep AdamW's slots, and the model saved is a diffusers folder."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from test_text2image import sd_config

    config = sd_config(tmp_path, shapes_dir, tiny_sd, training={"optimizer": "muon", "max_steps": 2},
                       text2image={"train_text_encoder": True})
    assert main(["train", str(config), "--no-progress"]) == 0
    checkpoint = tmp_path / "run/checkpoints/step-00000002"
    slots = load_file(str(checkpoint / "optimizer.safetensors"))
    groups = json.loads((checkpoint / "state.json").read_text())["optimizer"]["param_groups"]
    assert [(group["muon"], group["lr"]) for group in groups] == [(True, 1e-4), (False, 1e-4)] * 2  # UNet, CLIP
    for group in groups:
        for index in group["params"]:
            assert f"{index}.{'momentum_buffer' if group['muon'] else 'exp_avg'}" in slots
    # CLIP's AdamW tensors are its norms and biases and two tables: the token and position embeddings
    assert sum(slots[f"{index}.exp_avg"].ndim == 2 for index in groups[3]["params"]) == 2
    before = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(tmp_path / "run/model-no-ema", subfolder="unet").state_dict()
    name = "down_blocks.0.resnets.0.conv1.weight"
    assert not torch.equal(before[name], after[name])


def test_adamw_is_fused_except_under_fp16_where_a_skipped_step_must_be_seen():
    from difftrain.config import TrainingConfig
    from difftrain.training.optim import build_optimizer

    unet = _tiny_unet()
    fused = {precision: build_optimizer([{"params": list(unet.parameters())}],
                                        TrainingConfig(mixed_precision=precision), {"unet": unet}).defaults["fused"]
             for precision in ("no", "bf16", "fp16")}
    # GradScaler calls a fused AdamW's step even on an overflow, so accelerate would not see the step skipped.
    assert fused == {"no": True, "bf16": True, "fp16": None}
