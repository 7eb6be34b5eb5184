"""The KD loss against DESIGN.md section 4, computed by hand cell by cell."""

from __future__ import annotations

import math

import pytest
import torch

from deberta_rad.kd import distillation_loss


def loss_by_the_formula(logits: torch.Tensor, targets: torch.Tensor, alpha: float, temperature: float) -> float:
    """L_total = alpha * L_distill + (1 - alpha) * L_hard, each -sum_i log softmax(s_i / T)[y_i], batch mean."""
    totals = []
    for scores, labels in zip(logits.tolist(), targets.tolist(), strict=True):
        hard = distill = 0.0
        for s_i, y in zip(scores, labels, strict=True):
            for t, bucket in ((1.0, "hard"), (temperature, "distill")):
                log_norm = math.log(sum(math.exp(v / t) for v in s_i))
                value = -(s_i[y] / t - log_norm)
                if bucket == "hard":
                    hard += value
                else:
                    distill += value
        totals.append(alpha * distill + (1 - alpha) * hard)
    return sum(totals) / len(totals)


@pytest.mark.parametrize(("alpha", "temperature"), [(0.5, 2.0), (0.0, 3.0), (1.0, 0.5), (0.3, 1.0)])
def test_loss_matches_the_formula(alpha: float, temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 13, 4, generator=generator) * 3
    targets = torch.randint(0, 4, (5, 13), generator=generator)
    got = distillation_loss(logits, targets, alpha, temperature).item()
    assert got == pytest.approx(loss_by_the_formula(logits, targets, alpha, temperature), rel=1e-5)


def test_alpha_zero_is_the_summed_cross_entropy() -> None:
    logits = torch.randn(3, 13, 4)
    targets = torch.randint(0, 4, (3, 13))
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 4), targets.reshape(-1), reduction="sum") / 3
    assert distillation_loss(logits, targets, 0.0, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_has_gradients_for_every_head() -> None:
    logits = torch.zeros(2, 13, 4, requires_grad=True)
    distillation_loss(logits, torch.zeros(2, 13, dtype=torch.long), 0.5, 2.0).backward()
    assert torch.all(logits.grad[..., 0] < 0)  # raising the target's score lowers the loss


def test_bad_shapes_and_knobs_are_refused() -> None:
    with pytest.raises(ValueError, match="expected logits"):
        distillation_loss(torch.zeros(2, 13, 4), torch.zeros(2, 12, dtype=torch.long), 0.5, 2.0)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(torch.zeros(2, 13, 4), torch.zeros(2, 13, dtype=torch.long), 1.5, 2.0)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(torch.zeros(2, 13, 4), torch.zeros(2, 13, dtype=torch.long), 0.5, 0.0)
