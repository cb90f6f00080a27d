"""Observers on a real SmolLM2 layer: each lowers the error it is meant to lower."""

from __future__ import annotations

import pytest
import torch

from lowbit.calibration.observers import OBSERVERS, make_observer
from lowbit.data import read_text
from lowbit.ir.quant import Layout, fake_quant_with


def _error(x: torch.Tensor, obs_name: str, qdtype: str, symmetric: bool, layout: Layout,
           batches: list[torch.Tensor] | None = None) -> float:
    """Relative squared error of fake-quantizing ``x`` with qparams observed on ``batches`` (default: x)."""
    obs = make_observer(obs_name, qdtype, symmetric, layout)
    for b in batches or [x]:
        obs.observe(b)
    scale, zp = obs.qparams(x.shape)
    xq = fake_quant_with(x, scale, zp, qdtype, layout)
    return float((xq - x).pow(2).sum() / x.pow(2).sum())


@pytest.fixture(scope="module")
def layer3(smollm2):
    """Layer 3 of SmolLM2: its q_proj weight and the real input of its down_proj on WikiText text (256 tokens)."""
    model, tok = smollm2
    text = read_text("wikitext2-valid-calib")[:4000]
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :256]
    seen: list[torch.Tensor] = []
    layer = model.model.layers[3]
    hook = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    hook.remove()
    return layer.self_attn.q_proj.weight.detach(), seen[0][0]  # [576, 576], [256, 1536]


@pytest.mark.parametrize("symmetric,layout", [(True, Layout(0, None)), (False, Layout(1, 64))],
                         ids=["sym-per-channel", "asym-g64"])
def test_clipping_search_beats_min_max_on_real_weights(layer3, symmetric, layout):
    w, _ = layer3
    base = _error(w, "minmax", "int4", symmetric, layout)
    mse = _error(w, "mse", "int4", symmetric, layout)
    hist = _error(w, "histogram", "int4", symmetric, layout)
    assert mse < base * 0.9, (mse, base)  # measured on down_proj: 0.50x (per-channel), 0.72-0.84x (g64)
    assert hist < base, (hist, base)


@pytest.mark.parametrize("qdtype", ["int8", "int4"])
def test_outlier_robust_observers_beat_min_max_on_real_activations(layer3, qdtype):
    """down_proj's input has a few huge values: per-tensor static scales from min-max waste the grid on them."""
    _, x = layer3
    layout = Layout(None, None)
    base = _error(x, "minmax", qdtype, True, layout)
    for name in ("mse", "histogram", "percentile"):
        err = _error(x, name, qdtype, True, layout)
        assert err < base, (name, err, base)


def test_moving_average_ignores_a_one_off_outlier_batch(layer3):
    _, x = layer3
    batches = list(x.split(32))
    spiked = [b.clone() for b in batches]
    spiked[3][0, 0] = x.abs().max() * 50  # one corrupt token in one batch
    layout = Layout(None, None)
    ema = make_observer("ema", "int8", True, layout)
    mm = make_observer("minmax", "int8", True, layout)
    for b in spiked:
        ema.observe(b)
        mm.observe(b)
    assert ema.range()[1] < mm.range()[1] / 5
    assert _error(x, "ema", "int8", True, layout, spiked) < _error(x, "minmax", "int8", True, layout, spiked)


def test_observer_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown observer 'kl'.*minmax"):
        make_observer("kl", "int8", True, Layout())
    obs = make_observer("minmax", "int8", True, Layout(-1, None))
    with pytest.raises(ValueError, match="has seen no data"):
        obs.qparams([4, 8])
    obs.observe(torch.randn(4, 8))
    with pytest.raises(ValueError, match="5 groups in this batch, 8 before"):
        obs.observe(torch.randn(4, 5))
    for name in ("ema", "percentile"):  # percentile summed a one-group batch into 8 groups by broadcasting
        obs = make_observer(name, "int8", True, Layout(-1, None))
        obs.observe(torch.randn(4, 8))
        with pytest.raises(ValueError, match=f"observer {name}: 1 groups in this batch, 8 before"):
            obs.observe(torch.randn(4, 1))
    with pytest.raises(ValueError, match="symmetric only"):
        make_observer("mse", "fp8e4m3", False, Layout())
    assert set(OBSERVERS) == {"minmax", "ema", "percentile", "mse", "histogram"}
