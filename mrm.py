"""Masked Representation Modeling (MRM) for domain-adaptive semantic segmentation.

Zhou et al., "Masked Representation Modeling for Domain-Adaptive Segmentation", arXiv 2509.13801.
One file, nothing but torch: copy it into your UDA repository. Usage (paper Algorithm 1):

    rebuilder = Rebuilder(in_channels=2048)            # or [64, 128, 320, 512] for MiT/DAFormer
    optimizer.add_param_group({'params': rebuilder.parameters(), 'lr': 2e-4})   # an AdamW (its own beside SGD)
    f_t = encoder(x_t)                                 # one encoder pass on the target batch...
    loss_uda = uda_loss(decoder(f_t), pseudo_label, weight)        # ...decoder pass 1, as before
    loss_mrm = mrm_loss(decoder, rebuilder, f_t, pseudo_label, weight)  # decoder pass 2, Eq. 4
    loss = loss_sup + loss_uda + 1.0 * loss_mrm        # Eq. 5, lambda = 1
    loss.backward(); optimizer.step()
    ...
    prediction = decoder(encoder(x))                   # inference: the Rebuilder is dropped

The Rebuilder (Sec. 3.3) embeds the last encoder level on a 16x16 grid, masks 40% of the cells,
rebuilds them with two transformer blocks, projects back to every level and fuses (Eq. 6/7).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2-D sin-cos position embedding, MAE style: (grid_size**2, dim), row-major cells.

    The first half of the channels encodes the row, the second half the column; each half is
    [sin, cos] of position * 1/10000^(2i/half).
    """
    if dim % 4:
        raise ValueError(f"position embedding needs a dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                                torch.arange(grid_size, dtype=torch.float64), indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def random_mask(batch_size, grid_size, mask_ratio, device=None):
    """(B, 1, grid, grid) float mask, 1 = masked. Exactly round(ratio * cells) cells per sample,
    uniformly at random as in MAE (the paper's "uniform random sampling"), so every sample is
    masked the same amount; the official code's per-cell Bernoulli only matches on average."""
    cells = grid_size ** 2
    ranks = torch.rand(batch_size, cells, device=device).argsort(dim=1).argsort(dim=1)
    return (ranks < round(mask_ratio * cells)).float().view(batch_size, 1, grid_size, grid_size)


def resize_mask(mask, size):
    """The grid mask at a feature level's size (nearest neighbour), as a bool (B, 1, h, w)."""
    return F.interpolate(mask.float(), size=size, mode="nearest").bool()


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (eps 1e-6, as the official timm LayerNorm2d)."""

    def __init__(self, channels):
        super().__init__(channels, eps=1e-6)

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Block(nn.Module):
    """Pre-norm ViT block: x + Attn(LN(x)), x + MLP(LN(x))."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def attention(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def projector(embed_dim, out_channels, scale):
    """Fig. 3(a): log2(scale) transposed convs (x2 each), LN2d+GELU between them, then a 1x1 conv
    to the level's channels and a LN2d. Widths halve to embed_dim/2, then embed_dim/4 (official)."""
    layers, width = [], embed_dim
    for i in range(int(math.log2(scale))):
        if i > 0:
            layers += [LayerNorm2d(width), nn.GELU()]
        out = embed_dim // 2 ** min(i + 1, 2)
        layers.append(nn.ConvTranspose2d(width, out, kernel_size=4, stride=2, padding=1))
        width = out
    layers += [nn.Conv2d(width, out_channels, kernel_size=1), LayerNorm2d(out_channels)]
    return nn.Sequential(*layers)


class Rebuilder(nn.Module):
    """Masks and rebuilds encoder features (paper Sec. 3.3, Fig. 2-3); training only.

    in_channels: an int for a single-scale encoder (DeepLabV2: 2048), or one int per level, fine
        to coarse, for a hierarchical encoder (MiT: [64, 128, 320, 512]).
    scale_factors: the upsampling of each level's projector relative to the grid, powers of two.
        Default: 4 for a single level (64x64 DeepLabV2 features at 512 crops), and 2**(L-1-i) for
        level i of L (strides 4..32 give 8, 4, 2, 1). Any other feature size is handled by a final
        bilinear resize to the level's exact size, so any crop size works.
    forward(features, mask=None) returns features of the input's type (tensor or list) and shapes.
    mask: (B, 1, grid, grid), 1 = masked; drawn at random when not given.
    """

    def __init__(self, in_channels, embed_dim=512, depth=2, num_heads=16, mlp_ratio=4.0,
                 grid_size=16, mask_ratio=0.4, scale_factors=None):
        super().__init__()
        self.multi_scale = not isinstance(in_channels, int)
        self.in_channels = list(in_channels) if self.multi_scale else [in_channels]
        levels = len(self.in_channels)
        if scale_factors is None:
            scale_factors = [2 ** (levels - 1 - i) for i in range(levels)] if self.multi_scale else [4]
        scale_factors = [scale_factors] if isinstance(scale_factors, int) else list(scale_factors)
        if len(scale_factors) != levels or any(s < 1 or s & (s - 1) for s in scale_factors):
            raise ValueError(f"scale_factors must be {levels} power(s) of two, got {scale_factors}")
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        self.grid_size, self.mask_ratio = grid_size, mask_ratio

        self.embed = nn.Linear(self.in_channels[-1], embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, grid_size)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.projectors = nn.ModuleList(projector(embed_dim, c, s) for c, s in zip(self.in_channels, scale_factors))

        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def random_mask(self, batch_size, device=None):
        return random_mask(batch_size, self.grid_size, self.mask_ratio, device)

    def embed_to_grid(self, x):
        """Representation embedding: per-pixel linear C -> embed_dim, bilinear resize to the grid.
        The two commute (the resize's weights sum to 1), so the smaller map is embedded first."""
        grid = (self.grid_size, self.grid_size)

        def linear(t):
            return self.embed(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

        def resize(t):
            return t if t.shape[-2:] == grid else F.interpolate(t, size=grid, mode="bilinear", align_corners=False)

        if x.shape[-2] * x.shape[-1] > self.grid_size ** 2:
            return linear(resize(x))
        return resize(linear(x))

    def rebuild(self, tokens, mask):
        """Masked cells become the mask token; add positions; transformer blocks; final norm."""
        B, _, g, _ = mask.shape
        tokens = tokens.flatten(2).transpose(1, 2)
        masked = mask.flatten(2).transpose(1, 2).bool()
        x = torch.where(masked, self.mask_token.to(tokens.dtype), tokens) + self.pos_embed.to(tokens.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).transpose(1, 2).reshape(B, -1, g, g)

    def forward(self, features, mask=None):
        levels = self.check_features(features)
        B = levels[-1].shape[0]
        if mask is None:
            mask = self.random_mask(B, levels[-1].device)
        elif mask.shape != (B, 1, self.grid_size, self.grid_size):
            raise ValueError(f"mask must be (B, 1, grid, grid) = {(B, 1, self.grid_size, self.grid_size)}, "
                             f"got {tuple(mask.shape)}")
        rebuilt = self.rebuild(self.embed_to_grid(levels[-1]), mask.to(levels[-1].dtype))
        fused = []
        for f_t, project in zip(levels, self.projectors):
            f_o = project(rebuilt)
            if f_o.shape[-2:] != f_t.shape[-2:]:
                f_o = F.interpolate(f_o, size=f_t.shape[-2:], mode="bilinear", align_corners=False)
            # Eq. 6/7: f_r = M * f_o + (1 - M) * f_t; `where` keeps visible cells bit-identical.
            fused.append(torch.where(resize_mask(mask, f_t.shape[-2:]), f_o.to(f_t.dtype), f_t))
        return fused if self.multi_scale else fused[0]

    def check_features(self, features):
        if self.multi_scale != isinstance(features, (list, tuple)):
            kind = "a list of tensors" if self.multi_scale else "a tensor"
            raise TypeError(f"Rebuilder built for in_channels={self.in_channels} expects {kind}, "
                            f"got {type(features).__name__}")
        levels = list(features) if self.multi_scale else [features]
        channels = [f.shape[1] if f.dim() == 4 else None for f in levels]
        if channels != self.in_channels:
            shapes = [tuple(f.shape) for f in levels]
            raise ValueError(f"Rebuilder expects NCHW features with channels {self.in_channels}, got shapes {shapes}")
        return levels


class Masking(nn.Module):
    """Table 2(c)'s "Masking" ablation: (1 - M) * f_t, masked cells zeroed and nothing rebuilt. The
    Rebuilder's interface (a tensor or a list of levels, an optional mask), no parameters."""

    def __init__(self, grid_size=16, mask_ratio=0.4):
        super().__init__()
        self.grid_size, self.mask_ratio = grid_size, mask_ratio

    def random_mask(self, batch_size, device=None):
        return random_mask(batch_size, self.grid_size, self.mask_ratio, device)

    def forward(self, features, mask=None):
        levels = list(features) if isinstance(features, (list, tuple)) else [features]
        if mask is None:
            mask = self.random_mask(levels[-1].shape[0], levels[-1].device)
        masked = [f.masked_fill(resize_mask(mask, f.shape[-2:]), 0) for f in levels]
        return masked if isinstance(features, (list, tuple)) else masked[0]


def segmentation_ce(logits, target, weight=None, ignore_index=255, align_corners=False):
    """Pixel-wise cross-entropy of logits (B,K,h,w), upsampled bilinearly to target (B,H,W).

    No weight: mean over non-ignored pixels (nn.CrossEntropyLoss, DACS's source loss). With a weight, a
    number, one per image (B,) or one per pixel (B,H,W): mean over all pixels of weight * CE, as DACS's
    pseudo-label loss and every mmseg 0.16 loss (weight 1.0). An ignored pixel contributes 0; a batch with
    every pixel ignored gives 0, not NaN.
    """
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=align_corners)
    ce = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="none")
    if weight is None:
        return ce.sum() / (target != ignore_index).sum().clamp(min=1)
    if torch.is_tensor(weight) and weight.dim() > 0:
        if weight.shape == ce.shape[:1]:
            weight = weight.view(-1, 1, 1)
        elif weight.shape != ce.shape:
            raise ValueError(f"weight of shape {tuple(weight.shape)}: takes a number, one per image "
                             f"{tuple(ce.shape[:1])} or one per pixel {tuple(ce.shape)}")
    return (ce * weight).mean()


def mrm_loss(decoder, rebuilder, features, target, weight=None, ignore_index=255, align_corners=False, mask=None):
    """Eq. 4: CE(D(R(E(x_t))), pseudo-label). `features` are the encoder outputs the UDA loss
    already computed (no second encoder pass). Returns the unweighted loss: multiply by lambda
    (Eq. 5, 1.0 in the paper) yourself."""
    return segmentation_ce(decoder(rebuilder(features, mask)), target, weight, ignore_index, align_corners)
