"""Ops without a rule run at the student's width inside the teacher (fallback.py): only the op is frozen,
the channel spaces around it widen, and the teacher stays exact."""
import pytest
import torch
from torch import nn

from conftest import randomize

from gpd_surgery import api

timm_layers = pytest.importorskip("timm.layers")
register_notrace_module = timm_layers.register_notrace_module
from gpd_surgery.verification import verify


def mix(x):
    """Mixes channels in a way no rule knows (recorded as one call by fx)."""
    return torch.cumprod(torch.tanh(x.flip(1)), dim=1) + x.mean(1, keepdim=True)


torch.fx.wrap("mix")


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 1), nn.Linear(6, 4)

    def forward(self, x):
        y = self.a(x)
        y = y + mix(self.b(y))
        return self.head(y.mean((2, 3)))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(12, 5, 1), nn.Linear(5, 4)

    def forward(self, x):
        y = self.a(x)
        return self.head(self.b(torch.cat([y, mix(y)], 1)).mean((2, 3)))


class UnknownModule(nn.Module):
    """nn.LocalResponseNorm normalizes across neighbouring channels: no rule widens it."""

    def __init__(self):
        super().__init__()
        self.a, self.lrn, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.LocalResponseNorm(3), nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        y = self.a(x)
        y = self.b(self.lrn(y)) + y
        return self.head(y.mean((2, 3)))


@register_notrace_module  # a leaf of the trace that no rule knows, as timm makes PositionalEncodingFourier
class Encoding(nn.Module):
    """A module called with sizes only (timm's PositionalEncodingFourier): its output joins the stream."""

    def __init__(self, dim: int = 6):
        super().__init__()
        self.proj = nn.Conv2d(4, dim, 1)

    def forward(self, h: int, w: int):
        y = torch.linspace(0, 1, h).view(1, 1, h, 1) * torch.linspace(1, 2, w).view(1, 1, 1, w)
        return self.proj(torch.cat([y, y.cos(), y.sin(), y * y], 1).to(self.proj.weight.dtype))


class WithEncoding(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.pos, self.b, self.head = nn.Conv2d(3, 6, 3, padding=1), Encoding(), nn.Conv2d(6, 6, 1), \
            nn.Linear(6, 4)

    def forward(self, x):
        y = self.a(x)
        y = self.b(y + self.pos(y.shape[2], y.shape[3]))
        return self.head(y.mean((2, 3)))


class Recurrent(nn.Module):
    """An LSTM over the tokens of a feature map (sequencer2d): it returns (output, (h, c))."""

    def __init__(self):
        super().__init__()
        self.a, self.rnn, self.b, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.LSTM(6, 6, batch_first=True), \
            nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x):
        t = self.a(x).flatten(2).transpose(1, 2)
        y, _ = self.rnn(t)
        return self.head(self.b(y + t).mean(1))


@pytest.mark.parametrize("net", [Residual, Concat, UnknownModule, WithEncoding, Recurrent])
@pytest.mark.parametrize("ratio", [2.0, 3.0, 1.5])
def test_an_op_without_a_rule_runs_at_the_students_width(net, ratio):
    torch.manual_seed(0)
    model = randomize(net()).double()
    ex = api.expand(model, (2, 3, 6, 6), ratio, branches="default", capture="fx")  # fx keeps Encoding whole
    summary = api.summarize(ex.plan, ex.tensors)
    assert any("run at the student's width" in u for u in summary["unsupported_ops"])
    assert summary["frozen"] == [], summary["frozen"]  # nothing frozen: the spaces around the op widen
    assert summary["param_ratio"] > (1.5 if ratio >= 2 else 1.2)
    rep = verify(model, ex.plan, ex.tensors, device="cpu")
    assert rep.passed, rep.to_dict()
    assert all(c.max_rel <= 1e-10 for c in rep.checks + rep.inside if c.dtype == "float64")


def test_a_wrong_fallback_is_caught_inside():
    """The check inside compares the copied-out value with the student's: a teacher whose op read the wrong
    copies fails there, naming the node."""
    from gpd_surgery import fallback

    torch.manual_seed(0)
    model = randomize(Residual()).double()
    ex = api.expand(model, (1, 3, 6, 6), 2.0)
    real = fallback.canonical
    try:
        fallback.canonical = lambda src, size: real(src, size).flip(0)  # the copies in reverse order
        rep = verify(model, ex.plan, ex.tensors, device="cpu")
    finally:
        fallback.canonical = real
    assert not rep.passed and rep.divergence is not None


def test_an_lstm_keeps_its_size_and_the_stream_widens():
    torch.manual_seed(0)
    model = randomize(Recurrent()).double()
    ex = api.expand(model, (1, 3, 4, 4), 2.0)
    assert ex.tensors["rnn.weight_ih_l0"].shape == (24, 6)  # the LSTM's own weights: the student's
    assert ex.tensors["a.weight"].shape[0] == 12 and ex.tensors["b.weight"].shape == (12, 12)


def test_an_op_writing_in_place_is_still_frozen():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Conv2d(3, 6, 1), nn.Linear(6, 2)

        def forward(self, x):
            y = self.a(x)
            y.atan_()
            return self.head(y.mean((2, 3)))

    ex = api.expand(randomize(InPlace()), (1, 3, 4, 4), 2.0)
    summary = api.summarize(ex.plan, ex.tensors)
    assert summary["frozen"] and "atan_" in " ".join(summary["unsupported_ops"])


class Headless(nn.Module):
    """A backbone whose outputs are its residual stream (eva02 without a head), an op without a rule on it, and
    logits beside them."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.head = nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)
        self.block = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))

    def forward(self, x):
        y = self.embed(x)
        y = y + self.block(y)
        f = self.norm(y)
        return f, mix(f), self.head(f.mean(1))


@pytest.mark.parametrize("ratio", [2.0, 3.0, 1.5])
def test_a_stream_at_the_graph_outputs_widens_inside(ratio):
    """The stream leaves the graph narrowed to its canonical copies, so the whole stream widens; the logits keep
    their size (widening them would widen the head for nothing)."""
    torch.manual_seed(0)
    model = randomize(Headless()).double()
    ex = api.expand(model, (2, 4, 5), ratio, branches="default")
    wide = round(6 * ratio)
    assert ex.tensors["embed.weight"].shape[0] == wide and ex.tensors["norm.weight"].shape == (wide,)
    assert ex.tensors["head.weight"].shape == (3, wide)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    for s, t in zip(model(x), ex.teacher()(x)):
        assert s.shape == t.shape
    rep = verify(model, ex.plan, ex.tensors, device="cpu")
    assert rep.passed, rep.to_dict()
    assert all(c.max_rel <= 1e-10 for c in rep.checks + rep.inside if c.dtype == "float64")
