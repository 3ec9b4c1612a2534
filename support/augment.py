"""Colour jitter and Gaussian blur as DACS, DAFormer and MIC call them: kornia 0.5.8's ColorJitter and
GaussianBlur2d (DAFormer's pin) in plain torch, batched on the device. One draw per call decides whether the
whole batch is jittered (blurred); the jitter factors and the blur sigma are drawn per image."""
import math

import torch
import torch.nn.functional as F



# colour jitter and blur as DACS and DAFormer draw them: one draw per iteration decides whether the whole batch
# is jittered (p) and one whether it is blurred; the jitter factors and the blur sigma are drawn per image.
# The jitter is kornia 0.5.8's ColorJitter (DAFormer's pin) in plain torch.
def color_jitter(x, strength, p, one_call=False):
    """kornia.augmentation.ColorJitter(brightness=s, contrast=s, saturation=s, hue=s) of (B, 3, H, W) RGB in
    [0, 1], applied to the whole batch with probability p. Factors are drawn per image; the order of the
    operations per kornia call: per image (DACS/DAFormer call it per mixed image), or one for the batch
    with one_call (MIC calls it once on the target batch)."""
    B, device = x.shape[0], x.device

    def uniform(low, high):
        return low + (high - low) * torch.rand(B, device=device)

    factors = (uniform(max(0.0, 1 - strength), min(2.0, 1 + strength)), uniform(max(0.0, 1 - strength), 1 + strength),
               uniform(max(0.0, 1 - strength), 1 + strength), uniform(max(-0.5, -strength), min(0.5, strength)))
    order = torch.rand(1 if one_call else B, 4, device=device).argsort(dim=1).expand(B, 4)  # random permutations
    return torch.where(torch.rand((), device=device) < p, jitter_images(x, *factors, order), x)


def jitter_images(x, brightness, contrast, saturation, hue, order):
    """kornia 0.5.8 ColorJitter's apply_transform with per-image factors (B,) and orders (B, 4) of the operations
    0 brightness: x + (b - 1); 1 contrast: x * c; 2 saturation: HSV saturation * a; 3 hue: HSV hue + h * 2 pi
    (mod 2 pi); each clamps to [0, 1]. Each of the four steps computes the linear and the HSV kind for the batch
    and keeps the one the image's order names (no host sync); the other factors are the identity there, which
    leaves pixels bit-identical."""
    B = x.shape[0]
    brightness, contrast, saturation = (f.view(B, 1, 1, 1) for f in (brightness - 1, contrast, saturation))
    hue = hue.view(B, 1, 1, 1) * 2 * math.pi
    for step in range(4):
        op = order[:, step].view(B, 1, 1, 1)
        linear = ((x + torch.where(op == 0, brightness, 0)).clamp(0, 1) * torch.where(op == 1, contrast, 1)).clamp(0, 1)
        h, s, v = rgb_to_hsv(x).split(1, dim=1)
        hsv = torch.cat([torch.fmod(h + torch.where(op == 3, hue, 0), 2 * math.pi),
                         (s * torch.where(op == 2, saturation, 1)).clamp(0, 1), v], dim=1)
        x = torch.where(op >= 2, hsv_to_rgb(hsv), linear)
    return x


def rgb_to_hsv(x, eps=1e-6):
    """kornia's rgb_to_hsv of (B, 3, H, W) in [0, 1]: hue in [0, 2 pi), saturation (max - min) / (max + eps)."""
    value, argmax = x.max(dim=1)
    delta = value - x.min(dim=1).values
    saturation = delta / (value + eps)
    delta = torch.where(delta == 0, torch.ones_like(delta), delta)  # grey pixels: hue 0, no 0/0
    rc, gc, bc = (value[:, None] - x).unbind(dim=1)
    sextant = torch.stack([bc - gc, 2 * delta + rc - bc, 4 * delta + gc - rc], dim=1)
    hue = sextant.gather(1, argmax[:, None])[:, 0] / delta
    return torch.stack([2 * math.pi * ((hue / 6) % 1), saturation, value], dim=1)


def hsv_to_rgb(hsv):
    """kornia's hsv_to_rgb: the inverse of rgb_to_hsv (up to its eps), any real hue."""
    hue, saturation, value = hsv.unbind(dim=1)
    hue = hue / (2 * math.pi)
    sector = torch.floor(hue * 6) % 6
    fraction = (hue * 6) % 6 - sector
    p = value * (1 - saturation)
    q = value * (1 - fraction * saturation)
    t = value * (1 - (1 - fraction) * saturation)
    index = sector.long()[:, None]
    red, green, blue = ([value, q, p, p, t, value], [t, value, value, q, p, p], [p, p, t, value, value, q])
    return torch.cat([torch.stack(channel, dim=1).gather(1, index) for channel in (red, green, blue)], dim=1)


def blur_kernel_size(side):
    """DACS/DAFormer: about 10% of the side, odd (51 for 512)."""
    k = math.ceil(0.1 * side)
    return int(math.floor(k - 0.5 + k % 2))


def gaussian_blur(x, p, sigma_range=(0.15, 1.15), one_call=False):
    """kornia's GaussianBlur2d (reflect padding) with a kernel of ~10% of each side, for the whole batch with
    probability p; sigma uniform in the range per image, or one for the batch with one_call (as color_jitter).
    Separable: one grouped convolution per direction."""
    B, C, H, W = x.shape
    sigma = sigma_range[0] + torch.rand(1 if one_call else B, 1, device=x.device).expand(B, 1) * (
        sigma_range[1] - sigma_range[0])

    def kernel(size):
        taps = torch.arange(size, device=x.device, dtype=torch.float32) - size // 2
        weights = torch.exp(-taps ** 2 / (2 * sigma ** 2))
        return (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0).to(x.dtype)

    kh, kw = blur_kernel_size(H), blur_kernel_size(W)
    y = F.pad(x.reshape(1, B * C, H, W), (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    y = F.conv2d(y, kernel(kw).view(B * C, 1, 1, kw), groups=B * C)
    y = F.conv2d(y, kernel(kh).view(B * C, 1, kh, 1), groups=B * C).view(B, C, H, W)
    return torch.where(torch.rand((), device=x.device) < p, y, x)
