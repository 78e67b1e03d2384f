import pytest
import torch

from hypernet.guidance import hm_cfg, hm_cfg_two, sigma_in_subject_window, in_subject_window


def test_hm_cfg_against_hand_computed_values():
    u, c, p = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0]), torch.tensor([4.0, 1.0])
    # u + 7.5 (c - u) + 2 (p - c) = [1 + 15 + 2, -2 + 15 + 2]
    assert torch.equal(hm_cfg(u, c, p, 7.5, 2.0), torch.tensor([18.0, 15.0]))
    # gate closed: plain CFG on the base model
    assert torch.equal(hm_cfg(u, c, None, 7.5, 2.0), torch.tensor([16.0, 13.0]))
    # cfg_subject 0 ignores the subject model entirely
    assert torch.equal(hm_cfg(u, c, p, 7.5, 0.0), hm_cfg(u, c, None, 7.5, 0.0))
    # 2-prediction form: u + 3 (p - u)
    assert torch.equal(hm_cfg_two(u, p, 3.0), torch.tensor([10.0, 7.0]))


def test_coefficients_sum_to_one_so_x0_and_eps_forms_agree():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, generator=generator)
    sigma = 2.5
    eps = [torch.randn(4, generator=generator) for _ in range(3)]
    x0 = [x - sigma * e for e in eps]  # denoised = x - sigma * eps for each prediction
    combined_eps = hm_cfg(*eps, 6.0, 1.5)
    combined_x0 = hm_cfg(*x0, 6.0, 1.5)
    torch.testing.assert_close(combined_x0, x - sigma * combined_eps)


def test_dual_path_blend_is_the_cfg_text_one_case():
    u, c, p = torch.randn(3), torch.randn(3), torch.randn(3)
    torch.testing.assert_close(hm_cfg(u, c, p, 1.0, 0.3), 0.7 * c + 0.3 * p)


def test_schedule_gates():
    assert in_subject_window(0.0, 0.0, 1.0) and in_subject_window(0.5, 0.2, 0.5)
    assert not in_subject_window(0.6, 0.2, 0.5) and not in_subject_window(0.1, 0.2, 0.5)
    with pytest.raises(ValueError):
        in_subject_window(0.5, 0.6, 0.2)
    assert sigma_in_subject_window(5.0, 14.6, 0.03) and not sigma_in_subject_window(0.01, 14.6, 0.03)
