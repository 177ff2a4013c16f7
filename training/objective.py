"""The Real-Fake finetuning objective: min-SNR-weighted denoising MSE plus a linear-kernel distribution-matching
term that matches the batch's weighted first moment of predictions and targets.

Source: Yuan, Zhang, Sun, Torr, Zhao, "Real-Fake: Effective Training Data Synthesis Through Distribution
Matching", ICLR 2024. The settings used here (gamma 5, weight 0.003, epsilon and v-prediction targets) are listed
in the top-level README, "Finetuning with the Real-Fake objective"."""

from __future__ import annotations

import torch


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR_t = alpha_bar_t / (1 - alpha_bar_t) for each timestep."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr_t: torch.Tensor, gamma: float = 5.0, prediction_type: str = "epsilon") -> torch.Tensor:
    """Per-sample loss weights: min(SNR, gamma) / SNR for epsilon targets, min(SNR, gamma) / (SNR + 1) for v."""
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1.0)
    raise ValueError(f"unsupported prediction type {prediction_type!r} (epsilon or v_prediction)")


def distribution_matching(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean((sum_i w_i pred_i - sum_i w_i target_i)^2): the squared gap of the weighted batch sums."""
    w = weights.view(-1, *([1] * (pred.dim() - 1)))
    return ((w * pred).sum(0) - (w * target).sum(0)).pow(2).mean()


def realfake_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    snr_t: torch.Tensor,
    *,
    gamma: float = 5.0,
    dm_weight: float = 0.003,
    prediction_type: str = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, denoise, dm): L = sum_i w_i mse_i / B + lambda * L_dm, computed in float32."""
    pred, target = pred.float(), target.float()
    weights = min_snr_weights(snr_t, gamma, prediction_type)
    per_sample = (pred - target).pow(2).mean(dim=tuple(range(1, pred.dim())))
    denoise = (per_sample * weights).mean()
    dm = distribution_matching(pred, target, weights)
    return denoise + dm_weight * dm, denoise, dm
