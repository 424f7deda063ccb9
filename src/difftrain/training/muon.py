"""Muon on a model's hidden weight matrices, AdamW on the rest: `training.optimizer: muon`.

Muon (Jordan et al. 2024) replaces each matrix's momentum-smoothed gradient by its nearest
orthogonal matrix (a few Newton-Schulz iterations), so every direction of the update moves at the
same rate instead of the few largest. On the demo it draws in 900 steps the shapes AdamW needs
1,750 for (README, "Samplers"). Biases, norms, embedding tables and the model's first and last
layers stay with AdamW, as in Muon's reference recipe.

Ours rather than torch.optim.Muon, which takes 2-D parameters only and orthogonalises in bf16: a
convolution's kernel here is the matrix out x (in * kh * kw), and the iteration runs in fp32, since
a CPU without bf16 instructions emulates bf16 matmuls at a tenth of the fp32 speed. The step size is
Moonshot's (Liu et al. 2025): the learning rate times 0.2 * sqrt(max(rows, columns)), which gives
the update AdamW's RMS, so the AdamW learning rate carries over.
"""

from __future__ import annotations

import math

import torch
from torch.optim.adamw import adamw

# Keller Jordan's quintic coefficients (also torch.optim.Muon's): the steepest slope at zero that
# still leaves the singular values within about 0.5-1.5 after five iterations.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
MOMENTUM = 0.95
# Input and output layers by diffusers' names, wherever they sit (a UNet's `conv_in`, a VAE's
# `encoder.conv_in`, a ControlNet's `controlnet_cond_embedding.conv_out`): Muon's recipe leaves a
# network's first and last layer to AdamW.
EDGE_LAYERS = ("conv_in", "conv_out")


def orthogonalize(matrices: list[torch.Tensor], steps: int = NS_STEPS) -> list[torch.Tensor]:
    """Newton-Schulz iteration towards U V^T of each matrix's SVD (2-D, fp32, any shapes).

    Each iterate is a polynomial of the first Gram matrix times the matrix, so the iteration runs
    on the Gram matrices (rows x rows, the smaller side) and multiplies by the matrix once at the
    end: for a conv kernel (out x 9·in) a fraction of the iteration on the matrix itself, equal up
    to fp32's rounding. The Gram matrices of one size iterate together, so the demo's 63 matrices
    take three batched iterations (16, 32 and 64 rows) instead of one each. Its step: 11 ms against
    25 ms for the plain iteration batched by shape (a one-off timing; benchmarks/optimizer_step.py
    times the step against AdamW).
    """
    wide = [m.mT if m.size(0) > m.size(1) else m for m in matrices]
    by_shape: dict[torch.Size, list[int]] = {}
    for index, matrix in enumerate(wide):
        by_shape.setdefault(matrix.shape, []).append(index)
    stacked = {shape: torch.stack([wide[i] for i in indices]) for shape, indices in by_shape.items()}
    for x in stacked.values():
        x.div_(x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7))  # spectral norm <= Frobenius norm <= 1
    by_rows: dict[int, list[torch.Size]] = {}
    for shape in by_shape:
        by_rows.setdefault(shape[0], []).append(shape)
    result: list[torch.Tensor] = [None] * len(matrices)
    for shapes in by_rows.values():
        grams = torch.cat([stacked[shape] @ stacked[shape].mT for shape in shapes])
        polynomials = _iterate_on_gram(grams, steps).split([len(by_shape[shape]) for shape in shapes])
        for shape, polynomial in zip(shapes, polynomials):
            for index, orthogonal in zip(by_shape[shape], polynomial @ stacked[shape]):
                result[index] = orthogonal.mT if wide[index] is not matrices[index] else orthogonal
    return result


def _iterate_on_gram(gram: torch.Tensor, steps: int) -> torch.Tensor:
    """P with P X = the iteration's X after `steps`, from G = X X^T: X <- (a + b G + c G^2) X, G <- X X^T."""
    a, b, c = NS_COEFFICIENTS
    polynomial = None
    for step in range(steps):
        factor = b * gram + c * gram @ gram
        factor.diagonal(dim1=-2, dim2=-1).add_(a)
        polynomial = factor if polynomial is None else factor @ polynomial
        if step < steps - 1:
            gram = factor @ gram @ factor  # the next iterate's Gram matrix: factor and G commute
    return polynomial


def split_for_muon(groups: list[dict], modules: dict[str, torch.nn.Module]) -> list[dict]:
    """Each parameter group split in two, same settings: its hidden matrices (`muon: True`) and the rest."""
    kept_for_adamw = set()
    for module in modules.values():
        for name, child in module.named_modules():
            if isinstance(child, torch.nn.Embedding) or name.rsplit(".", 1)[-1] in EDGE_LAYERS:
                kept_for_adamw.update(id(p) for p in child.parameters(recurse=False))
    split = []
    for group in groups:
        parts = {True: [], False: []}  # muon or not
        for p in group["params"]:
            parts[p.ndim >= 2 and id(p) not in kept_for_adamw].append(p)
        split += [{**group, "params": part, "muon": flag} for flag, part in parts.items() if part]
    return split


def fits_fused_adamw(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these tensors (for build_optimizer's AdamW and Muon's AdamW half).
    It does the whole update in one kernel per dtype: on a 54M-parameter UNet on 2 CPU cores x2.6 the
    default per-tensor loop's speed with host memory kept (31 against 82 ms a step; x4.4 before, 73
    against 323 ms; benchmarks/optimizer_step.py). Same math, same state dict."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the groups marked `muon`, torch's AdamW (fused where it can be) for the others.

    One optimizer, so the loop, the learning-rate schedule, clipping and checkpoints see nothing
    new: the state dict is torch's format (a momentum buffer per Muon matrix; AdamW's step,
    exp_avg and exp_avg_sq per other tensor).
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 momentum: float = MOMENTUM):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      muon=False))
        self._mark_fused()

    def __setstate__(self, state):  # what torch's load_state_dict ends with
        super().__setstate__(state)
        self._mark_fused()  # a checkpoint written before groups carried the flag

    def _mark_fused(self) -> None:
        # Decided once, and kept in the group: torch's load_state_dict reads it there to put a fused
        # group's step counts on the parameters' device.
        for group in self.param_groups:
            group.setdefault("fused", not group["muon"] and fits_fused_adamw(group["params"]))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group["muon"] else self._adamw_step)(group, params)
        return loss

    def _muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        momentum, lr, decay = group["momentum"], group["lr"], group["weight_decay"]
        grads = [p.grad for p in params]
        for p in params:
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
        updates = torch._foreach_add(grads, buffers, alpha=momentum)  # Nesterov
        flat = [update.reshape(update.size(0), -1).float() for update in updates]
        orthogonal = [matrix.view_as(p).to(p.dtype) for matrix, p in zip(orthogonalize(flat), params)]
        torch._foreach_mul_(orthogonal, [0.2 * math.sqrt(max(matrix.shape)) for matrix in flat])  # AdamW's RMS
        if decay:
            torch._foreach_mul_(params, 1 - lr * decay)
        torch._foreach_add_(params, orthogonal, alpha=-lr)

    def _adamw_step(self, group: dict, params: list[torch.Tensor]) -> None:
        fused = group["fused"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        adamw(
            params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params], [], [self.state[p]["step"] for p in params],
            fused=fused or None, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
