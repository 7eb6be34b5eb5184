"""The DeBERTa-RAD knowledge-distillation objective (DESIGN.md section 4, exactly as in the paper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _summed_nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """-sum_i log softmax(s_i / T)[y_i] per report: the per-finding heads' losses add up."""
    log_probs = F.log_softmax(logits / temperature, dim=-1)
    picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return -picked.sum(dim=-1)


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """L_total = alpha * L_distill + (1 - alpha) * L_hard, averaged over the batch.

    logits: [B, 13, 4] student scores; targets: [B, 13] teacher status indices. L_hard uses T = 1 and
    L_distill uses T = temperature, both against the teacher's hard label.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, F, S] and targets [B, F]; got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ValueError(f"alpha must be in [0, 1] and temperature > 0; got {alpha}, {temperature}")
    hard = _summed_nll(logits, targets, 1.0)
    distill = _summed_nll(logits, targets, temperature)
    return (alpha * distill + (1.0 - alpha) * hard).mean()
