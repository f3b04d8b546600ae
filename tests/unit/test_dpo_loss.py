"""losses.dpo_loss against hand-computed values and a plain loop over pairs, gradients included."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_rlhf.losses import dpo_loss

DT = torch.float64


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def loop_loss(c, r, rc, rr, beta, loss_type, ls):
    """The four losses written out per pair, as the DPO, IPO, SLiC and robust-DPO papers state them."""
    out = []
    for ci, ri, rci, rri in zip(c, r, rc, rr):
        d = (ci - rci) - (ri - rri)
        if loss_type == "sigmoid":
            out.append(-(1 - ls) * logsig(beta * d) - ls * logsig(-beta * d))
        elif loss_type == "ipo":
            out.append((d - 1 / (2 * beta)) ** 2)
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - beta * d))
        else:
            out.append((-(1 - ls) * logsig(beta * d) + ls * logsig(-beta * d)) / (1 - 2 * ls))
    return sum(out) / len(out)


def test_hand_values():
    # one pair: chosen ratio +1, rejected ratio -1 -> delta = 2; beta 0.5 -> beta * delta = 1
    c, r, rc, rr = (torch.tensor([x], dtype=DT) for x in (-3.0, -6.0, -4.0, -5.0))
    loss, stats = dpo_loss(c, r, rc, rr, 0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0)))  # -log sigmoid(1) = 0.31326
    assert float(stats["rewards/chosen"]) == pytest.approx(0.5) and float(stats["rewards/rejected"]) == pytest.approx(-0.5)
    assert float(stats["rewards/margins"]) == pytest.approx(1.0) and float(stats["rewards/accuracies"]) == 1.0
    assert float(dpo_loss(c, r, rc, rr, 0.5, "ipo")[0]) == pytest.approx((2 - 1) ** 2)  # (delta - 1/(2 beta))^2
    assert float(dpo_loss(c, r, rc, rr, 0.5, "hinge")[0]) == pytest.approx(0.0)  # max(0, 1 - 1)
    assert float(dpo_loss(c, r, rc, rr, 0.25, "hinge")[0]) == pytest.approx(0.5)  # max(0, 1 - 0.5)
    cdpo = -(0.9 * logsig(1.0) + 0.1 * logsig(-1.0))
    assert float(dpo_loss(c, r, rc, rr, 0.5, "sigmoid", 0.1)[0]) == pytest.approx(cdpo)
    robust = (-0.9 * logsig(1.0) + 0.1 * logsig(-1.0)) / 0.8
    assert float(dpo_loss(c, r, rc, rr, 0.5, "robust", 0.1)[0]) == pytest.approx(robust)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_matches_loop_and_its_gradient(loss_type, ls):
    g = torch.Generator().manual_seed(3)
    c, r, rc, rr = (torch.randn(7, generator=g, dtype=DT) * 3 - 10 for _ in range(4))
    c, r = c.requires_grad_(), r.requires_grad_()
    loss, stats = dpo_loss(c, r, rc, rr, 0.3, loss_type, ls)
    assert float(loss) == pytest.approx(loop_loss(c.tolist(), r.tolist(), rc.tolist(), rr.tolist(), 0.3, loss_type, ls))
    loss.backward()
    # central differences of the plain loop, pair by pair
    h = 1e-6
    for tensor, grad in ((c, c.grad), (r, r.grad)):
        for i in range(7):
            up, down = [x.detach().clone() for x in (c, r)], [x.detach().clone() for x in (c, r)]
            k = 0 if tensor is c else 1
            up[k][i] += h
            down[k][i] -= h
            num = (loop_loss(*[x.tolist() for x in up], rc.tolist(), rr.tolist(), 0.3, loss_type, ls)
                   - loop_loss(*[x.tolist() for x in down], rc.tolist(), rr.tolist(), 0.3, loss_type, ls)) / (2 * h)
            assert float(grad[i]) == pytest.approx(num, abs=1e-6), (loss_type, i)
    beta_c, beta_r = 0.3 * (c.detach() - rc), 0.3 * (r.detach() - rr)
    assert float(stats["rewards/accuracies"]) == pytest.approx(float((beta_c > beta_r).double().mean()))
    assert float(stats["rewards/margins"]) == pytest.approx(float((beta_c - beta_r).mean()))


def test_unknown_loss_type_is_refused():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(x, x, x, x, 0.1, "kto")
