"""Timestep batching: a family's several same-shaped model calls of one batch made as fewer, larger ones.

GM_t / ML_t query the denoiser at ten timesteps of the same images, DL at one timestep with five noise
draws, PIA and PIAN at one timestep with two inputs. With timestep batching on, those calls are
concatenated along the batch dimension (row r of a call: image r mod B of group r div B, with a
per-row timestep tensor and the conditioning repeated per group) and cut into chunks of at most
`max_rows` rows, so a batch of 16 makes GM's 20 calls as 2 of 160 rows. The inputs (seeded noise
included) are exactly those of the unbatched calls, and so is every operation after the model call: only
the denoiser sees a larger batch, whose kernels may round differently in the last bits (measured and
bounded in tests/features/test_timestep_batching.py). `FeatureBatch.calls` carries the choice.

Adapters see a per-row timestep through `eps_hat_rows`: an adapter's own `eps_hat_rows(z, t, cond)` when
it has one, else the pixel UNet, DiT and Stable Diffusion (XL) calls written out here as their `eps_hat`
makes them (same keyword arguments, same epsilon conversion), else one `eps_hat` per distinct timestep
(no gain, same bits).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from cdi.models.base import DiffusionAdapter

MODES = ("auto", "on", "off")


def select_rows(cond: Any, index: torch.Tensor) -> Any:
    """The conditioning of the images `index` (with repeats): every (B, ...) tensor in it indexed by rows;
    None stays None. Raises TypeError for a conditioning it cannot take apart."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond.index_select(0, index.to(cond.device))
    if dataclasses.is_dataclass(cond) and not isinstance(cond, type):
        changes = {f.name: select_rows(getattr(cond, f.name), index) for f in dataclasses.fields(cond)
                   if isinstance(getattr(cond, f.name), torch.Tensor)}
        return dataclasses.replace(cond, **changes)
    raise TypeError(f"conditioning of type {type(cond).__name__} cannot be split into rows")


def _row_alpha_bar(adapter: DiffusionAdapter, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    ab = adapter.alphas_cumprod[t.to(adapter.alphas_cumprod.device)]
    return ab.view(-1, *([1] * (like.dim() - 1)))


def eps_hat_rows(adapter: DiffusionAdapter, z_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
    """eps_hat with one model timestep per row (`t`: a (N,) long tensor), differentiable w.r.t. `z_t`."""
    own = getattr(adapter, "eps_hat_rows", None)
    if callable(own):
        return own(z_t, t, cond)
    from cdi.models.dit import DiTAdapter
    from cdi.models.pixel_unet import PixelUNetAdapter
    from cdi.models.prediction import to_epsilon
    from cdi.models.stable_diffusion import StableDiffusionAdapter

    t = t.to(device=z_t.device, dtype=torch.long)
    if isinstance(adapter, PixelUNetAdapter):
        out = adapter.unet(z_t, t, class_labels=cond).sample
    elif isinstance(adapter, DiTAdapter):
        out = adapter.transformer(z_t, timestep=t, class_labels=cond).sample
    elif isinstance(adapter, StableDiffusionAdapter):
        added = None
        if cond.pooled_embeds is not None:
            added = {"text_embeds": cond.pooled_embeds, "time_ids": cond.time_ids}
        out = adapter.unet(z_t, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added).sample
    else:  # an adapter this module does not know: one call per distinct timestep, in row order
        out = torch.empty_like(z_t)
        for value in torch.unique(t).tolist():
            rows = (t == value).nonzero().flatten()
            out = out.index_copy(0, rows, adapter.eps_hat(z_t.index_select(0, rows), int(value),
                                                          select_rows(cond, rows)))
        return out
    return to_epsilon(out[:, : z_t.shape[1]], z_t, _row_alpha_bar(adapter, t, z_t), adapter.prediction_type)


@dataclass(frozen=True)
class ModelCalls:
    """How a family's groups of same-shaped model calls are made: one call per group (`batched` False:
    the calls of today, bit for bit), or concatenated into calls of at most `max_rows` rows (None: all
    groups of a family in one call)."""

    batched: bool = False
    max_rows: int | None = None

    def _chunks(self, n_rows: int) -> list[tuple[int, int]]:
        size = n_rows if self.max_rows is None else max(1, min(self.max_rows, n_rows))
        return [(start, min(start + size, n_rows)) for start in range(0, n_rows, size)]

    def eps_hat(self, adapter: DiffusionAdapter, inputs: Sequence[torch.Tensor], timesteps: Sequence[int],
                cond: Any) -> list[torch.Tensor]:
        """[eps_hat(inputs[k], timesteps[k], cond) for k]: every input (B, ...) of the same batch of images."""
        if not self.batched or len(inputs) < 2:
            return [adapter.eps_hat(z, t, cond) for z, t in zip(inputs, timesteps)]
        z, t_rows, image = self._rows(inputs, timesteps)
        outputs = [eps_hat_rows(adapter, z[a:b], t_rows[a:b], select_rows(cond, image[a:b]))
                   for a, b in self._chunks(z.shape[0])]
        return list(torch.cat(outputs).split(inputs[0].shape[0]))

    def loss_gradients(self, adapter: DiffusionAdapter, inputs: Sequence[torch.Tensor], timesteps: Sequence[int],
                       cond: Any, targets: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per group k: the loss ||eps_hat(z_k, t_k) - target_k||_2 per image (detached) and its gradient
        w.r.t. z_k. Batched, each chunk's graph is freed before the next chunk runs."""
        from cdi.features.base import l2

        if not self.batched or len(inputs) < 2:
            losses, grads = [], []
            for z, t, target in zip(inputs, timesteps, targets):
                with torch.enable_grad():
                    z_t = z.detach().requires_grad_(True)
                    loss = l2(adapter.eps_hat(z_t, t, cond) - target)
                    (grad,) = torch.autograd.grad(loss.sum(), z_t)
                losses.append(loss.detach())
                grads.append(grad)
            return losses, grads
        z, t_rows, image = self._rows(inputs, timesteps)
        target = torch.cat(list(targets))
        losses, grads = [], []
        for a, b in self._chunks(z.shape[0]):
            with torch.enable_grad():
                z_t = z[a:b].detach().requires_grad_(True)
                loss = l2(eps_hat_rows(adapter, z_t, t_rows[a:b], select_rows(cond, image[a:b])) - target[a:b])
                (grad,) = torch.autograd.grad(loss.sum(), z_t)
            losses.append(loss.detach())
            grads.append(grad)
        size = inputs[0].shape[0]
        return list(torch.cat(losses).split(size)), list(torch.cat(grads).split(size))

    @staticmethod
    def _rows(inputs: Sequence[torch.Tensor], timesteps: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size = inputs[0].shape[0]
        if any(z.shape != inputs[0].shape for z in inputs):
            raise ValueError("timestep batching needs inputs of one shape")
        device = inputs[0].device
        t_rows = torch.tensor([int(t) for t in timesteps], dtype=torch.long, device=device).repeat_interleave(size)
        image = torch.arange(size, device=device).repeat(len(inputs))
        return torch.cat(list(inputs)), t_rows, image


UNBATCHED = ModelCalls()
