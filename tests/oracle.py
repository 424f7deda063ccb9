"""An exact denoiser for data drawn from a few blurred images.

For data that is a uniform mixture of Gaussians N(m_k, s^2 I), the best possible
prediction at every noise level is known in closed form. A sampler driven by it must land
within about `s` of one of the m_k; one that does not is misconfigured. This checks the
sampler table against every noise schedule without training a network. (s > 0 keeps the
probability-flow ODE smooth near t = 0, as a trained network's is.)
"""

from __future__ import annotations

import torch


class MixtureOracle:
    def __init__(self, points: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str, spread: float = 0.1):
        self.points = points.double()  # (K, C, H, W) component means, in [-1, 1]
        self.spread = spread
        # A zero-terminal-SNR schedule ends at exactly 0; the samplers floor that step at 2^-24, so does the oracle.
        self.alphas_cumprod = alphas_cumprod.double().clamp(min=2.0**-24)
        self.prediction_type = prediction_type
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = sigmas.log()

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        # Sigma-based schedulers pass fractional timesteps, interpolated in log sigma the
        # way diffusers maps sigmas back to timesteps.
        t = t.double().clamp(0, len(self.alphas_cumprod) - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=len(self.alphas_cumprod) - 1)
        frac = t - low
        log_sigma = (1 - frac) * self.log_sigmas[low] + frac * self.log_sigmas[high]
        return 1 / (1 + (2 * log_sigma).exp())

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1)[:1].expand(x.shape[0]) if t.dim() else t.expand(x.shape[0])
        ab = self.alpha_bar(t).view(-1, 1, 1, 1)
        xt = x.double()
        variance = ab * self.spread**2 + 1 - ab  # of x_t given the component
        residual = xt[:, None] - ab.sqrt()[:, None] * self.points[None]  # (N, K, C, H, W)
        distances = (residual**2).flatten(2).sum(-1)
        weights = torch.softmax(-distances / (2 * variance.view(-1, 1)), dim=1)
        posterior_means = self.points[None] + (ab.sqrt() * self.spread**2 / variance)[:, None] * residual
        x0 = torch.einsum("nk,nkchw->nchw", weights, posterior_means)
        eps = (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
        if self.prediction_type == "epsilon":
            out = eps
        elif self.prediction_type == "v_prediction":
            out = ab.sqrt() * eps - (1 - ab).sqrt() * x0
        else:
            out = x0
        return out.to(x.dtype)
