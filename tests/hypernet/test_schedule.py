import torch

from hypernet import NoiseSchedule
from hypernet.schedule import eps_from_denoised


def test_sigma_space_is_x0_plus_sigma_eps_and_the_denoised_prediction_gives_back_eps():
    schedule = NoiseSchedule.scaled_linear()
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64), torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64)
    timesteps = torch.tensor([0, 10, 500, 999])
    schedule = NoiseSchedule(schedule.alphas_cumprod.double())
    x, sigma = schedule.to_sigma_space(schedule.add_noise(x0, eps, timesteps), timesteps)
    assert sigma.shape == (4, 1, 1, 1)
    torch.testing.assert_close(sigma.flatten(), schedule.sigmas(timesteps))
    torch.testing.assert_close(x, x0 + sigma * eps)
    torch.testing.assert_close(eps_from_denoised(x, x0, sigma), eps)


def test_schedule_from_its_own_sigmas_is_the_same_schedule():
    schedule = NoiseSchedule.scaled_linear()
    rebuilt = NoiseSchedule.from_sigmas(schedule.sigmas(torch.arange(schedule.num_timesteps)))
    torch.testing.assert_close(rebuilt.alphas_cumprod, schedule.alphas_cumprod)
