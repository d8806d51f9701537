import pytest
import torch

from soco_d2.engine.health_metrics import collapse_warning, embedding_std, rank_drop_warning, rankme


def test_rankme_and_std_of_known_matrices():
    g = torch.Generator().manual_seed(0)
    # 4 orthogonal directions with equal energy: effective rank 4, whatever the dimension
    basis = torch.linalg.qr(torch.randn(32, 4, generator=g))[0].T  # (4, 32) orthonormal rows
    z = torch.randn(400, 4, generator=g) @ basis
    assert rankme(z) == pytest.approx(4.0, rel=0.05)
    # unequal energy lowers it below the rank
    skew = torch.randn(400, 4, generator=g) * torch.tensor([1.0, 1.0, 1.0, 0.05])
    assert 2.5 < rankme(skew @ basis) < 3.5
    # complete collapse: every row the same vector
    same = torch.randn(1, 32, generator=g).expand(100, 32)
    assert rankme(same) == pytest.approx(1.0, abs=1e-3)
    assert embedding_std(same) == pytest.approx(0.0, abs=1e-6)
    # isotropic Gaussian rows: normalised, each coordinate has std ~ 1/sqrt(D)
    iso = torch.randn(5000, 64, generator=g)
    assert embedding_std(iso) == pytest.approx(1 / 8, rel=0.03)


def test_collapse_warning_text():
    assert collapse_warning(0.1, 64, 0.1, 40.0, 7) is None
    text = collapse_warning(0.001, 64, 0.1, 1.2, 7)
    assert "iteration 7" in text and "0.125" in text and "EMA momentum" in text and "predictor" in text


def test_rank_drop_warning_text():
    assert rank_drop_warning(25.0, 100.0, 0.25, 9) is None  # at the threshold: no warning
    assert rank_drop_warning(30.0, 100.0, 0.0, 9) is None  # off
    text = rank_drop_warning(24.9, 100.0, 0.25, 9)
    assert "iteration 9" in text and "24.90" in text and "0.25 x 100.00" in text
    assert "LARS_TRUST_COEF" in text and "RANK_DROP_RATIO" in text
