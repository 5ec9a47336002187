"""fedllm.grad_sample: per-example gradients of nn.Linear layers against the definition (one
backward pass per example, plain autograd)."""

import pytest
import torch
from torch import nn

from fedllm.grad_sample import LinearGradSampler, supports


class TwoUse(nn.Module):
    """A frozen body, a trainable linear used twice (shared weights), a trainable head on
    mean-pooled positions: 3-D and 2-D layer inputs, bias and no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 6)
        self.body.requires_grad_(False)
        self.shared = nn.Linear(6, 6, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (n, T, 5)
        h = torch.tanh(self.body(x))
        h = self.shared(torch.tanh(self.shared(h)))  # (n, T, 6)
        return self.head(h.mean(dim=1))  # (n, 3)


def _per_example(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(len(x)):
        net.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in net.named_parameters():
            if p.requires_grad:
                out.setdefault(n, []).append(p.grad.detach().clone())
    net.zero_grad(set_to_none=True)
    return {n: torch.stack(g) for n, g in out.items()}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_one_backward_per_example(reduction):
    torch.manual_seed(0)
    net = TwoUse()
    x, y = torch.randn(7, 4, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    net.double()
    want = _per_example(net, x, y)
    with LinearGradSampler(net, loss_reduction=reduction):
        losses = nn.functional.cross_entropy(net(x), y, reduction="none")
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
        got = {n: p.grad_sample for n, p in net.named_parameters() if p.requires_grad}
        # The per-example pieces add up to the batch gradient autograd computed.
        for n, p in net.named_parameters():
            if p.requires_grad:
                scale = len(x) if reduction == "mean" else 1
                torch.testing.assert_close(got[n].sum(0), p.grad * scale)
    assert set(got) == {"shared.weight", "head.weight", "head.bias"}
    for n in want:
        assert got[n].shape == (7, *dict(net.named_parameters())[n].shape)
        torch.testing.assert_close(got[n], want[n])
    # Closed: no hooks, no attribute left behind.
    assert not any(hasattr(p, "grad_sample") for p in net.parameters())
    assert not any(m._forward_hooks for m in net.modules())


def test_under_bf16_autocast_per_example_gradients_are_fp32():
    """Autocast hands the hooks bf16 inputs and output gradients; the per-example gradients
    (and so the clip norms computed from them) are in the parameters' fp32, and equal the
    definition under the same autocast to bf16's precision."""
    torch.manual_seed(0)
    net = TwoUse()
    x, y = torch.randn(5, 4, 5), torch.randint(0, 3, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _per_example(net, x, y)
        with LinearGradSampler(net, loss_reduction="sum"):
            nn.functional.cross_entropy(net(x), y, reduction="none").float().sum().backward()
            got = {n: p.grad_sample for n, p in net.named_parameters() if p.requires_grad}
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n], want[n].float(), rtol=0.05, atol=0.02)


def test_a_frozen_weight_leaves_only_the_bias():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 2))
    net[0].weight.requires_grad_(False)
    x = torch.randn(4, 3)
    with LinearGradSampler(net, loss_reduction="sum"):
        (net(x) ** 2).sum().backward()
        assert not hasattr(net[0].weight, "grad_sample")
        torch.testing.assert_close(net[0].bias.grad_sample, 2 * net(x).detach())


def test_no_grad_and_eval_passes_record_nothing():
    net = nn.Sequential(nn.Linear(3, 2))
    with LinearGradSampler(net):
        with torch.no_grad():
            net(torch.randn(4, 3))
        assert not hasattr(net[0].weight, "grad_sample")
        net(torch.randn(4, 3)).sum().backward()
        assert net[0].weight.grad_sample.shape == (4, 2, 3)


def test_refuses_models_with_other_trainable_layers():
    net = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    assert not supports(net)
    with pytest.raises(ValueError, match="LayerNorm"):
        LinearGradSampler(net)
    net[1].requires_grad_(False)
    assert supports(net)
    net.requires_grad_(False)
    assert not supports(net)  # nothing trainable: nothing to clip
    with pytest.raises(ValueError, match="loss_reduction"):
        LinearGradSampler(nn.Linear(2, 2), loss_reduction="none")  # type: ignore[arg-type]
