"""Our Muon: torch's algorithm, with Newton–Schulz in the hardware's native precision and shapes batched."""

from __future__ import annotations

import pytest
import torch

from tinygpt_core import device as device_mod
from tinygpt_core.muon import Muon, orthogonalise


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(32, 96), (32, 96), (96, 32), (32, 32), (32, 96)]  # repeated shapes are batched together
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]


def _grads(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _run(opt_factory, steps: int = 3) -> list[torch.Tensor]:
    params = _params()
    opt = opt_factory(params)
    for k in range(steps):
        _grads(params, 100 + k)
        opt.step()
    return [p.detach().clone() for p in params]


def test_fp32_newton_schulz_makes_singular_values_near_one():
    x = torch.randn(3, 24, 80, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(orthogonalise(x.float()))
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic iteration's band, not exact orthogonality
    tall = torch.linalg.svdvals(orthogonalise(x.mT.float().contiguous()))
    assert torch.allclose(tall, s, atol=1e-5)  # a tall matrix is done on its transpose


def test_matches_torch_muon_in_bf16_and_close_in_fp32():
    kw = dict(lr=0.02, weight_decay=0.1)
    ref = _run(lambda ps: torch.optim.Muon(ps, adjust_lr_fn="match_rms_adamw", **kw))
    ours_bf16 = _run(lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **kw))
    ours_fp32 = _run(lambda ps: Muon(ps, ns_dtype=torch.float32, **kw))
    for r, b, f, start in zip(ref, ours_bf16, ours_fp32, _params()):
        moved = (r - start).abs().mean()  # how far three steps took the weights
        assert (r - b).abs().max() <= 1e-3 * moved  # the same maths in the same precision (0 on x86 CPUs)
        # fp32 iterations differ from torch's bf16 ones by bf16's own rounding: under 15% of the move.
        assert 0 < (r - f).abs().max() < 0.15 * moved


@pytest.mark.parametrize("native, expected", [(False, torch.float32), (True, torch.bfloat16)])
def test_newton_schulz_precision_follows_the_cpu(monkeypatch, native, expected):
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: native)
    seen = []
    import tinygpt_core.muon as muon_mod

    real = muon_mod.orthogonalise
    monkeypatch.setattr(muon_mod, "orthogonalise", lambda x, *a: seen.append(x.dtype) or real(x, *a))
    params = _params()
    opt = Muon(params, lr=0.01)
    _grads(params, 5)
    opt.step()
    assert set(seen) == {expected}
    assert len(seen) == 3, "one batched iteration per distinct shape"
    assert all(p.dtype == torch.float32 for p in params)


def test_a_torch_muon_checkpoint_loads_and_continues_the_same():
    kw = dict(lr=0.02, weight_decay=0.1)
    params = _params()
    ref = torch.optim.Muon(params, adjust_lr_fn="match_rms_adamw", **kw)
    _grads(params, 1)
    ref.step()
    state = ref.state_dict()
    ours = Muon([torch.nn.Parameter(p.detach().clone()) for p in params], ns_dtype=torch.bfloat16, **kw)
    ours.load_state_dict(state)
    for p_ref, p_ours in zip(params, ours.param_groups[0]["params"]):
        assert torch.equal(ref.state[p_ref]["momentum_buffer"], ours.state[p_ours]["momentum_buffer"])
    assert ours.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"


def test_refuses_anything_but_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])
