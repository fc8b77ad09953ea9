"""Losses as modules that wrap a network; the network knows nothing of its loss.

Each loss is an ``nn.Module`` whose ``forward(batch) -> (loss, logs)`` runs the wrapped network,
so one trainer (and one DDP wrapper around the loss) trains any of them. ``loss.net`` is the
network whose weights are checkpointed, averaged (EMA) and exported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

NUM_TRAIN_TIMESTEPS = 1000  # the transformer sees t = s * 1000, as in diffusers' SANA pipelines


def sample_flow_sigmas(
    n: int, logit_mean: float, logit_std: float, shift: float, device: torch.device,
    terminal: float = 0.0, terminal_from: float = 0.97,
) -> torch.Tensor:
    """Flow times s in (0, 1): logit-normal (SD3 / SANA), then the flow shift s' = k s / (1 + (k - 1) s).

    With ``terminal`` > 0 that share of the samples (in expectation) instead takes s uniform in
    [``terminal_from``, 1), up to pure noise: the sampler's first step starts there, and the
    logit-normal draw almost never does (~0.3 % above 0.98 even with shift 3), so without these
    samples the model extrapolates its noisiest prediction. No extra random numbers are drawn when
    ``terminal`` is 0, so older runs resume exactly.
    """
    s = torch.sigmoid(torch.randn(n, device=device) * logit_std + logit_mean)  # (n,)
    if shift != 1.0:
        s = shift * s / (1 + (shift - 1) * s)
    if terminal > 0:
        pick = torch.rand(n, device=device) < terminal  # (n,)
        end = terminal_from + (1 - terminal_from) * torch.rand(n, device=device)  # (n,) in [from, 1)
        s = torch.where(pick, end, s)
    return s


class FlowMatchingLoss(nn.Module):
    """Rectified-flow velocity loss with caption dropout for classifier-free guidance.

    batch: ``latents`` (B, C, H, W) already scaled, ``hidden`` (B, L, C_txt), ``mask`` (B, L).
    ``null_hidden`` / ``null_mask`` are the text features of the empty prompt, which the pipeline
    uses as the unconditional branch, so a dropped caption is exactly what CFG will feed.

    ``coarse`` > 0 adds a multiscale term: the mean squared velocity error after ``coarse_factor`` x
    ``coarse_factor`` average pooling, times ``coarse_factor**2``. For an error with no spatial
    structure (white) the term equals the plain loss; for an error that is the same over a pooling
    window (a misplaced object, a wrong colour of a region) it is ``coarse_factor**2`` times larger.
    It weighs the coarse layout that the noisiest steps decide above the per-pixel detail they cannot
    predict (the multiscale loss of "simple diffusion", Hoogeboom et al. 2023). The pooled error keeps
    its per-image mean, so an error in a uniform background is weighed up as much as a layout error.
    """

    def __init__(
        self,
        net: nn.Module,
        null_hidden: torch.Tensor,
        null_mask: torch.Tensor,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        caption_dropout: float = 0.1,
        coarse: float = 0.0,
        coarse_factor: int = 4,
        terminal: float = 0.0,
        terminal_from: float = 0.97,
    ):
        super().__init__()
        self.net = net
        self.coarse, self.coarse_factor = coarse, coarse_factor
        self.terminal, self.terminal_from = terminal, terminal_from
        self.register_buffer("null_hidden", null_hidden.detach().float().reshape(1, *null_hidden.shape[-2:]))
        self.register_buffer("null_mask", null_mask.detach().long().reshape(1, -1))
        self.logit_mean, self.logit_std, self.shift = logit_mean, logit_std, shift
        self.caption_dropout = caption_dropout

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch and scalars to log."""
        x0 = batch["latents"].float()  # (B, C, H, W)
        hidden, mask = batch["hidden"].float(), batch["mask"].long()  # (B, L, Ct), (B, L)
        b = x0.shape[0]
        if self.training and self.caption_dropout > 0:
            drop = torch.rand(b, device=x0.device) < self.caption_dropout  # (B,)
            hidden = torch.where(drop[:, None, None], self.null_hidden.to(hidden.dtype), hidden)
            mask = torch.where(drop[:, None], self.null_mask, mask)
        s = sample_flow_sigmas(b, self.logit_mean, self.logit_std, self.shift, x0.device,
                               self.terminal, self.terminal_from)  # (B,)
        noise = torch.randn_like(x0)
        sb = s[:, None, None, None]
        xt = (1 - sb) * x0 + sb * noise  # (B, C, H, W)
        target = noise - x0
        pred = self.net(xt, hidden, s * NUM_TRAIN_TIMESTEPS, encoder_attention_mask=mask).float()
        loss = F.mse_loss(pred, target)
        if self.coarse > 0:
            f = self.coarse_factor
            coarse = F.avg_pool2d(pred - target, f, ceil_mode=True).pow(2).mean() * f * f
            return loss + self.coarse * coarse, {"loss": loss.detach(), "loss_coarse": coarse.detach()}
        return loss, {"loss": loss.detach()}


def frequency_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean |FFT(x) - FFT(y)| over the 2-D spectrum (orthonormal), which weighs edges and fine detail."""
    fx = torch.fft.rfft2(x.float(), norm="ortho")
    fy = torch.fft.rfft2(y.float(), norm="ortho")
    return (fx - fy).abs().mean()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of images in [-1, 1] (peak-to-peak 2), computed on [0, 1]."""
    mse = ((x.float().clamp(-1, 1) - y.float().clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)  # (B,)
    return -10 * torch.log10(mse.clamp_min(1e-12))


class PatchDiscriminator(nn.Module):
    """A small PatchGAN discriminator (strided convs, GroupNorm, LeakyReLU) for the adversarial term."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for _ in range(1, layers):
            mods += [nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.GroupNorm(8, ch * 2), nn.LeakyReLU(0.2)]
            ch *= 2
        mods.append(nn.Conv2d(ch, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> patch logits (B, 1, H/2^layers, W/2^layers)."""
        return self.net(x)


class DCAELoss(nn.Module):
    """DC-AE reconstruction: l1 |x - x'| + l2 (x - x')^2 + freq |F(x) - F(x')| (+ adversarial hinge).

    batch: ``images`` (B, 3, H, W) in [-1, 1]. With ``adv > 0`` a PatchGAN is trained jointly; the
    generator term goes through the discriminator with detached weights (torch.func), so one
    backward pass gives both the autoencoder's and the discriminator's gradients correctly.
    """

    def __init__(
        self,
        net: nn.Module,
        l1: float = 1.0,
        l2: float = 0.0,
        freq: float = 0.1,
        adv: float = 0.0,
        adv_start: int = 0,
        latent_noise: float = 0.0,
    ):
        super().__init__()
        self.net = net
        self.l1, self.l2, self.freq = l1, l2, freq
        self.adv, self.adv_start, self.latent_noise = adv, adv_start, latent_noise
        self.discriminator = PatchDiscriminator() if adv > 0 else None
        # The trainer sets the step, so the adversarial term can start late (as in VQGAN / DC-AE).
        self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch and scalars to log."""
        x = batch["images"]  # (B, 3, H, W) in [-1, 1]
        z = self.net.encode(x, tiling=False)  # (B, C, h, w)
        if self.training and self.latent_noise > 0:
            z = z + self.latent_noise * torch.randn_like(z) * z.detach().float().std()
        rec = self.net.decode(z, tiling=False).float()  # (B, 3, H, W)
        x = x.float()
        l1 = (rec - x).abs().mean()
        l2 = (rec - x).pow(2).mean()
        fr = frequency_loss(rec, x)
        loss = self.l1 * l1 + self.l2 * l2 + self.freq * fr
        logs = {"loss_l1": l1.detach(), "psnr": psnr(rec.detach(), x).mean()}
        if self.freq:
            logs["loss_freq"] = fr.detach()
        if self.discriminator is not None:
            on = (self.step >= self.adv_start).float()
            params = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            g_logits = functional_call(self.discriminator, params, (rec,))
            g_loss = -g_logits.float().mean()
            real = self.discriminator(x)
            fake = self.discriminator(rec.detach())
            d_loss = F.relu(1 - real.float()).mean() + F.relu(1 + fake.float()).mean()
            loss = loss + on * (self.adv * g_loss + d_loss)
            logs["loss_g"], logs["loss_d"] = g_loss.detach(), d_loss.detach()
        logs["loss"] = loss.detach()
        return loss, logs
