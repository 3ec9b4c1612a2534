"""Street scenes drawn on the fly in a game-like source style and a photo-like target style (--task toy): a
domain gap of colour, texture and layout that a CPU can adapt across in minutes."""
from functools import lru_cache

import numpy as np



TOY_CLASSES = ('road', 'sidewalk', 'building', 'vegetation', 'sky', 'car', 'pole')


TOY_SCENE = (64, 128)  # (height, width) of a toy scene
TOY_PALETTE = np.array([(128, 64, 128), (244, 35, 232), (70, 70, 70), (107, 142, 35),
                        (70, 130, 180), (0, 0, 142), (153, 153, 153)], np.uint8)  # Cityscapes colours


ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR, POLE = range(len(TOY_CLASSES))


# Base colour per class. Target objects blend towards the target colours (hue, brightness shifts
# that avoid other classes' source colours), so shape, layout and relative brightness transfer.
_BASE = {'source': np.array([(90, 90, 100), (200, 170, 150), (180, 110, 80), (60, 170, 60),
                             (110, 180, 250), (0, 0, 0), (200, 190, 60)], float),
         'target': np.array([(115, 105, 100), (185, 150, 140), (185, 155, 110), (120, 140, 50),
                             (165, 195, 225), (0, 0, 0), (80, 80, 85)], float)}


# Car paints replace the class base colour; a target car blends from its source paint.
_CAR_PAINT = {'source': np.array([(220, 40, 40), (40, 80, 220), (240, 200, 30), (240, 240, 240),
                                  (30, 160, 160)]),
              'target': np.array([(60, 60, 65), (175, 175, 180), (150, 40, 40), (50, 70, 130),
                                  (220, 220, 215)])}


# Geometry differs a little between domains: the target city is greener and has less traffic.
_COUNTS = {'source': dict(trees=(0, 3), cars=(1, 5), poles=(1, 4), hedge=0.3),
           'target': dict(trees=(2, 6), cars=(0, 3), poles=(1, 4), hedge=0.6)}


BODY, GLASS, DARK, MARKING = range(4)  # parts within an object, rendered differently per style


# Per part: colour = object colour * mul + add (windows, tyres/trunks, lane paint).
_PARTS = {'source': (np.array([[1], [0.6], [0.2], [0]], np.float32),
                    np.array([(0, 0, 0), (60, 70, 90), (40, 35, 30), (250, 250, 250)], np.float32)),
          'target': (np.array([[1], [0.3], [0.2], [0]], np.float32),
                    np.array([(0, 0, 0), (45, 60, 80), (40, 35, 30), (230, 225, 200)], np.float32))}


# Target textures: weight per class of (fine noise, blotches, paving joints, facade stripes, height).
_TEXTURE = np.array([(6, 10, 0, 0, 0), (5, 0, -25, 0, 0), (6, 0, 0, 8, 0), (30, 20, 0, 0, 0),
                     (0, 15, 0, 0, 40), (4, 0, 0, 0, 0), (4, 0, 0, 0, 0)], np.float32)


@lru_cache(maxsize=8)
def _grid(h, w):
    """Pixel coordinates plus the static target patterns, cached per image size."""
    yy, xx = np.mgrid[:h, :w]
    tiles = ((yy % 4 == 0) | (xx % 6 == 0)).astype(np.float32)  # paving joints
    stripes = np.sin(xx * 1.3).astype(np.float32)  # facade columns / window frames
    vignette = 1 - 0.4 * (((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2)
    return yy, xx, tiles, stripes, (yy / h).astype(np.float32), vignette.astype(np.float32)


def toy_layout(rng, style='source', size=TOY_SCENE):
    """Random street geometry: object-index map, per-object classes, part map and label map."""
    H, W = size
    yy, xx = _grid(H, W)[:2]
    counts = _COUNTS[style]
    h0 = int(H * rng.uniform(0.35, 0.5))  # horizon row, also the road's vanishing row

    # Facades of random widths along the horizon; per-column lookups keep this vectorised.
    nb = 14  # enough facades of at least 0.08 W to span the image
    right = np.cumsum((W * rng.uniform(0.08, 0.22, nb)).astype(int)) - int(rng.uniform(0, 0.1) * W)
    left = np.concatenate([[right[0] - W], right[:-1]])
    top = h0 - (H * rng.uniform(0.1, 0.38, nb)).astype(int)
    top[rng.random(nb) < 0.15] = h0  # occasional gap lets the sky reach the horizon
    py, px = rng.integers(3, 6, nb), rng.integers(3, 6, nb)  # window grid periods
    # Facade index of each column; on tiny images rounding may leave a remainder for the last one.
    b = np.minimum(np.searchsorted(right, xx[0], side='right'), nb - 1)
    tc, lc, rc, pyc, pxc = top[b], left[b], right[b], py[b], px[b]
    y, x = yy[:h0], xx[:h0]
    obj = np.zeros(size, np.int32)
    obj[:h0] = np.where(y >= tc, 1 + b, 0)
    part = np.zeros(size, np.uint8)
    part[:h0] = GLASS * ((y > tc) & (y < h0 - 2) & (x > lc) & (x < rc - 1)
                         & ((y - tc) % pyc < pyc // 2) & ((x - lc) % pxc < pxc // 2))
    classes = [SKY] + [BUILDING] * nb

    # Ground: perspective road, sidewalks beside it, then facades or hedges at the image sides.
    vx, cb = W * rng.uniform(0.35, 0.65), W * rng.uniform(0.4, 0.6)
    rw, sw = rng.uniform(0.3, 0.45), rng.uniform(1.3, 1.7)
    t = (np.arange(h0, H) - h0 + 1) / (H - h0)  # 0 at the horizon, 1 at the bottom row
    dx = xx[h0:] - (vx + (cb - vx) * t)[:, None]
    ad, road_hw = np.abs(dx), (rw * W * t)[:, None]
    n = len(classes)  # ids: road, left/right sidewalk, left/right outer strip
    obj[h0:] = np.where(ad < road_hw, n, np.where(ad < sw * road_hw, n + 1, n + 3) + (dx >= 0))
    classes += [ROAD, SIDEWALK, SIDEWALK] + [VEGETATION if rng.random() < counts['hedge'] else BUILDING
                                             for _ in range(2)]
    # Dashed centre line; dashes repeat in depth (1/t), so they shorten towards the horizon.
    dash = (2.0 / t) % 1 < 0.5
    part[h0:][(ad < np.maximum(0.5, 0.012 * W * t)[:, None]) & dash[:, None]] = MARKING

    def paint(cls, y0, y1, x0, x1, shape=None, p=BODY, i=None):
        """Painter's algorithm on a clipped box; `shape` carves a mask out of the box."""
        if i is None:
            classes.append(cls)
            i = len(classes) - 1
        ys, xs = slice(max(int(y0), 0), min(int(y1), H)), slice(max(int(x0), 0), min(int(x1), W))
        if ys.start < ys.stop and xs.start < xs.stop:
            m = slice(None) if shape is None else shape(yy[ys, :1], xx[:1, xs])  # column x row
            obj[ys, xs][m], part[ys, xs][m] = i, p
        return i

    def uni(lo, hi):  # Generator.uniform costs ~5 us per scalar call, too slow here
        return lo + (hi - lo) * rng.random()

    # Trees, poles and cars, painted far-to-near; `near` is 0 at the horizon, 1 at the bottom.
    things = [(kind, h0 + uni(*span) * (H - h0))
              for kind, span in (('tree', (0, 0.4)), ('pole', (0.1, 0.8)), ('car', (0.1, 1.1)))
              for _ in range(rng.integers(*counts[kind + 's']) + 1)]
    for kind, yb in sorted(things, key=lambda k: k[1]):
        near, side = (yb - h0 + 1) / (H - h0), -1 if rng.random() < 0.5 else 1
        cx, road_hw, s = vx + (cb - vx) * near, rw * W * near, 0.2 + near  # s: perspective scale
        if kind == 'tree':
            r = s * H * uni(0.12, 0.22)
            x, trunk = cx + side * (road_hw * sw + r * uni(-0.5, 1.5)), r * uni(0.5, 1.2)
            i = paint(VEGETATION, yb - trunk - r, yb, x - max(1, r * 0.15), x + max(1, r * 0.15), p=DARK)
            for _ in range(3):  # a few overlapping ellipses make a blobby canopy
                ey, ex = yb - trunk - r * uni(0.6, 1.2), x + r * uni(-0.6, 0.6)
                ry, rx = r * uni(0.6, 1.0), r * uni(0.7, 1.2)
                paint(VEGETATION, ey - ry, ey + ry + 1, ex - rx, ex + rx + 1, i=i,
                      shape=lambda y, x_: ((y - ey) / ry) ** 2 + ((x_ - ex) / rx) ** 2 < 1)
        elif kind == 'pole':
            ph, pw = s * H * uni(0.45, 0.7), max(1, round(s * 1.5))
            x = cx + side * road_hw * uni(1.05, 1.25)
            i = paint(POLE, yb - ph, yb, x, x + pw)
            if rng.random() < 0.5:  # street-lamp arm reaching over the road
                arm = x - side * s * W * 0.06
                paint(POLE, yb - ph, yb - ph + pw, min(x, arm), max(x + pw, arm), i=i)
        else:
            cw = s * W * uni(0.2, 0.26)
            ch, x0 = cw * uni(0.55, 0.7), cx + uni(-0.8, 0.8) * road_hw - cw / 2
            i = paint(CAR, yb - 0.2 * ch, yb, x0 + 0.08 * cw, x0 + 0.3 * cw, p=DARK)  # tyres
            paint(CAR, yb - 0.2 * ch, yb, x0 + 0.7 * cw, x0 + 0.92 * cw, p=DARK, i=i)
            paint(CAR, yb - 0.6 * ch, yb - 0.15 * ch, x0, x0 + cw, i=i)  # body
            paint(CAR, yb - ch, yb - 0.6 * ch, x0 + 0.15 * cw, x0 + 0.85 * cw, i=i)  # cabin
            paint(CAR, yb - 0.9 * ch, yb - 0.62 * ch, x0 + 0.2 * cw, x0 + 0.8 * cw, p=GLASS, i=i)
    classes = np.array(classes)
    return obj, classes, part, np.take(classes.astype(np.uint8), obj)


def _smooth_noise(rng, h, w, cell):
    """Bilinearly upsampled Gaussian noise: blotches about `cell` pixels wide."""
    g = rng.standard_normal((h // cell + 2, w // cell + 2), np.float32)
    y, x = np.arange(h, dtype=np.float32) / cell, np.arange(w, dtype=np.float32) / cell
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], x - x0
    rows = np.take(g, y0, 0) * (1 - fy) + np.take(g, y0 + 1, 0) * fy  # interpolate rows, then columns
    return np.take(rows, x0, 1) * (1 - fx) + np.take(rows, x0 + 1, 1) * fx


def _blur(img):
    """Separable [1, 2, 1] / 4 blur of a CxHxW image with edge replication, like a soft lens."""
    p = np.concatenate([img[:, :1], img, img[:, -1:]], 1)
    img = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
    p = np.concatenate([img[..., :1], img, img[..., -1:]], 2)
    return (p[..., :-2] + 2 * p[..., 1:-1] + p[..., 2:]) / 4


def toy_render(rng, layout, style):
    """Colour a layout in 'source' (flat game look) or 'target' (textured, lit, noisy photo look)."""
    obj, classes, part, lab = layout
    H, W = lab.shape
    n, cars = len(classes), classes == CAR
    paint = rng.integers(len(_CAR_PAINT['source']), size=cars.sum())  # each car keeps its paint
    colours = _BASE['source'][classes]
    colours[cars] = _CAR_PAINT['source'][paint]
    if style == 'target':
        # Each object lies between its game look and the target look, so self-training can
        # spread from source-like (easy) objects to fully shifted ones.
        shifted = _BASE['target'][classes]
        shifted[cars] = _CAR_PAINT['target'][paint]
        a = rng.uniform(0, 1, (n, 1))
        colours = (1 - a) * colours + a * shifted
    # Per-object variation, mostly in brightness; real objects vary more than game assets.
    shade, tint = (20, 8) if style == 'target' else (10, 6)
    colours += rng.normal(0, shade, (n, 1)) + rng.normal(0, tint, (n, 3))
    mul, add = _PARTS[style]
    table = (colours[:, None] * mul + add).reshape(-1, 3).T.astype(np.float32)  # (3, object*part)
    # Channel-first with np.take: numpy broadcasts over a trailing axis of 3 very slowly.
    img = np.take(table, obj * len(mul) + part, 1)
    noise = rng.standard_normal((H, W), np.float32)  # luminance noise; cheaper than per channel
    if style == 'target':
        _, _, tiles, stripes, height, vignette = _grid(H, W)
        fine = rng.standard_normal((H, W), np.float32)
        patterns = (fine, _smooth_noise(rng, H, W, 6), tiles, stripes, height)
        img += sum(np.take(weight, lab) * pattern for weight, pattern in zip(_TEXTURE.T, patterns))
        # Global lighting: colour cast, exposure and contrast, a top-to-bottom gradient, vignette.
        cast = (rng.uniform(0.94, 1.06, 3) * rng.uniform(0.8, 1.15)).astype(np.float32)[:, None, None]
        light = (1 + rng.uniform(-0.2, 0.2) * (height - 0.5)) * vignette
        img = _blur(((img - 128) * rng.uniform(0.85, 1.1) + 128) * light * cast)
    img += (6 if style == 'target' else 3) * noise
    return np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)), lab


def make_toy_scene(rng, style, size=TOY_SCENE):
    """One (image uint8 HxWx3 RGB, label uint8 HxW) scene in 'source' or 'target' style."""
    if style not in _BASE:
        raise ValueError(f"style must be 'source' or 'target', got {style!r}")
    return toy_render(rng, toy_layout(rng, style, size), style)
