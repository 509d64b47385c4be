"""Noise optimisation (NO) at t = 100: how far must z_t move for the model to predict its noise?

eps ~ N(0, I); z_t = q(z0, t, eps); minimise f(delta) = ||eps_hat(z_t + delta, t) - eps||_2 from
delta = 0. Features: NO_loss = f(delta*) (the minimised objective itself) and NO_delta = ||delta*||_2.

Two reference-code bugs are fixed here (method doc, section 3.7): the reference optimised one float64
vector for a whole batch on the CPU, coupling every image to its batch-mates, and re-noised the
optimised latent before its final forward. cdi runs an independent L-BFGS per image, vectorised over
the batch on the model's device, with a fixed budget of function+gradient evaluations, and reports
the best objective value it evaluated.

The optimiser (per image): two-loop L-BFGS direction from accepted curvature pairs (s, y) with
s.y > 1e-3 ||s|| ||y|| (pairs dominated by rounding are skipped), initial step min(1, 1/||g||_1) as
torch's L-BFGS, and a trust region: a step never moves delta by more than `no_max_step` per entry
(RMS), so a nearly linear model cannot send delta off to infinity. A step is accepted only when it
lowers f, otherwise the step is halved along the same direction (backtracking). Every evaluation
counts against the budget, so each image costs exactly `no_evals` forward+backward passes.
"""

from __future__ import annotations

import torch

from cdi.features.base import FeatureBatch, FeatureFamily, FeatureOutput, Passes, count, l2, positive, timestep
from cdi.models.base import DiffusionAdapter

_CURVATURE_EPS = 1e-10


_RELATIVE_CURVATURE = 1e-3


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1)


def lbfgs_direction(grad: torch.Tensor, history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per-row two-loop recursion; `history` holds (s, y, valid) with rows that skip invalid pairs."""
    q = grad.clone()
    alphas = []
    gamma = torch.ones(grad.shape[0], device=grad.device, dtype=grad.dtype)
    have_pair = torch.zeros_like(gamma, dtype=torch.bool)
    for s, y, valid in reversed(history):
        sy = _rowdot(s, y)
        rho = torch.where(valid, 1.0 / sy.clamp_min(_CURVATURE_EPS), torch.zeros_like(sy))
        alpha = rho * _rowdot(s, q)
        q = q - alpha[:, None] * y
        alphas.append((alpha, rho, s, y))
        newest = valid & ~have_pair
        gamma = torch.where(newest, sy / _rowdot(y, y).clamp_min(_CURVATURE_EPS), gamma)
        have_pair = have_pair | valid
    r = gamma[:, None] * q
    for alpha, rho, s, y in reversed(alphas):
        beta = rho * _rowdot(y, r)
        r = r + (alpha - beta)[:, None] * s
    return -r


class NoiseOptimisation(FeatureFamily):
    names = ("NO_loss", "NO_delta")
    access = "white"
    settings = (timestep("no_t", 100), count("no_evals", 8), positive("no_max_step", 0.1))

    def passes(self) -> Passes:
        # Both features come from one optimisation: `no_evals` objective evaluations, each with its gradient.
        return Passes(forward_backward=self.config.no_evals)

    def compute(self, adapter: DiffusionAdapter, batch: FeatureBatch) -> FeatureOutput:
        delta, loss = self.optimise(adapter, batch)
        values = {"NO_loss": loss, "NO_delta": l2(delta)}
        return FeatureOutput({name: value for name, value in values.items() if name in self.wanted})

    def optimise(self, adapter: DiffusionAdapter, batch: FeatureBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The best perturbation found per image and the objective value there."""
        t = adapter.timestep(self.config.no_t)
        eps = batch.noise(batch.z0, "NO", self.config.no_t)
        z_t = adapter.q(batch.z0, t, eps).detach()
        shape = z_t.shape

        def objective(delta_flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.enable_grad():
                delta = delta_flat.detach().view(shape).requires_grad_(True)
                loss = l2(adapter.eps_hat(z_t + delta, t, batch.cond) - eps)
                (grad,) = torch.autograd.grad(loss.sum(), delta)
            return loss.detach().float(), grad.flatten(1).float()

        x = torch.zeros(shape[0], z_t[0].numel(), device=z_t.device, dtype=torch.float32)
        f, g = objective(x)
        step = torch.clamp(1.0 / g.abs().sum(dim=1).clamp_min(1e-12), max=1.0)
        history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        has_curvature = torch.zeros(shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.config.no_evals - 1):
            direction = lbfgs_direction(g, history)
            proposal = step[:, None] * direction
            radius = self.config.no_max_step * proposal.shape[1] ** 0.5
            proposal = proposal * (radius / proposal.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)[:, None]
            x_new = x + proposal
            f_new, g_new = objective(x_new)
            accept = torch.isfinite(f_new) & (f_new < f)
            s, y = x_new - x, g_new - g
            valid = accept & (_rowdot(s, y) > _RELATIVE_CURVATURE * s.norm(dim=1) * y.norm(dim=1) + _CURVATURE_EPS)
            history.append((s, y, valid))
            has_curvature = has_curvature | valid
            x = torch.where(accept[:, None], x_new, x)
            g = torch.where(accept[:, None], g_new, g)
            f = torch.where(accept, f_new, f)
            # Accepted with curvature: unit quasi-Newton step; rejected: halve and retry.
            step = torch.where(accept, torch.where(has_curvature, torch.ones_like(step), step), step * 0.5)
        return x.view(shape), f
