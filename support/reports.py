"""Debug grids: what one iteration did, for the first image of its batch, as DAFormer's and MIC's debug images
show it, plus MRM's view (the masked cells and what the decoder predicts from the rebuilt features); the class
legend every picture of predictions carries."""
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from support.base import atomic_write
from support.data import TASKS
from support.hrda import HRDAModel, HRDAOutput, Views, rebuilt_features


def debug_panels(cfg, nets, seen):
    """[(title, HxWx3 uint8)] of a step's tensors (`seen`, what it returned; the first image); the predictions are
    the student's after that step, in eval mode, on the step's own mixed image, MRM mask and MIC image."""
    seen = {key: value[:1] for key, value in seen.items() if value is not None}
    palette = np.concatenate([TASKS[cfg.task]["palette"], np.zeros((256 - len(TASKS[cfg.task]["palette"]), 3),
                                                                     np.uint8)])  # ignore (255) is black

    def image(x):
        return (x[0].float().clamp(0, 1).permute(1, 2, 0) * 255).round().byte().cpu().numpy()

    def labels(y):
        return palette[y[0].cpu().numpy().astype(np.uint8)]

    def grey(w):
        return np.repeat((w[0].float().clamp(0, 1) * 255).round().byte().cpu().numpy()[..., None], 3, axis=-1)

    def predict(logits, size):
        logits = logits.fused if isinstance(logits, HRDAOutput) else logits
        return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=cfg.align_corners).argmax(1)

    x_m, y_m = seen["mixed_image"], seen["mixed_label"]
    size = x_m.shape[-2:]
    panels = [("source image", image(seen["source_image"])), ("source label", labels(seen["source_label"])),
              ("target image", image(seen["target_image"])), ("pseudo-label", labels(seen["pseudo_label"])),
              ("pseudo-label weight", grey(seen["pixel_weight"])), ("ClassMix mask", grey(seen["mix"].float())),
              ("mixed image", image(x_m)), ("mixed target", labels(y_m))]
    if "detail_window" in seen:
        (top, left, side), = seen["detail_window"]
        outside = np.full(image(x_m).shape[:2] + (1,), 0.3)
        outside[top:top + side, left:left + side] = 1
        panels.append((f"HRDA detail window ({side}x{side})", (image(x_m) * outside).round().astype(np.uint8)))
    model, training = nets.model, nets.model.training
    model.eval()
    try:
        with torch.no_grad():
            # HRDA: the inference views (detail windows sliding over the crop), which draw no random window
            features = model.encoder.slide(x_m) if isinstance(model, HRDAModel) else model.encoder(x_m)
            clean = predict(model.decoder(features), size)
            panels.append(("prediction on the mixed image", labels(clean)))
            if "mrm_input" in seen:
                panels += [("MRM masked input", image(seen["mrm_input"])),
                           ("prediction on the masked input", labels(predict(model(seen["mrm_input"]), size)))]
            elif "mrm_mask" in seen:
                mask = seen["mrm_mask"]
                dark = F.interpolate(mask.float(), size=size, mode="nearest")[0, 0].cpu().numpy()[..., None]
                if isinstance(features, Views):  # the context's mask, and on every detail window the same
                    mask = mask.repeat(1 + len(features.boxes), 1, 1, 1)
                rebuilt = predict(model.decoder(rebuilt_features(nets.rebuilder, features, mask)), size)
                differs = rebuilt != clean
                wrong = (rebuilt != y_m) & (y_m != 255)
                panels += [(f"MRM mask ({mask.shape[-1]}x{mask.shape[-1]})",
                            (image(x_m) * (1 - 0.7 * dark)).round().astype(np.uint8)),
                           ("prediction from rebuilt features", labels(rebuilt)),
                           ("rebuilt differs from clean", grey(differs.float())),
                           ("rebuilt differs from target", grey(wrong.float()))]
            if "mic_image" in seen:
                panels += [("MIC masked image", image(seen["mic_image"])),
                           ("MIC prediction", labels(predict(model(seen["mic_image"]), size)))]
    finally:
        model.train(training)
    return panels


def write_debug_grid(cfg, nets, seen, path, columns=4, width=256):
    """The panels, each scaled to `width` pixels wide under its title, `columns` a row; a legend of the task's
    classes (and of ignore, black) below them."""
    panels = debug_panels(cfg, nets, seen)
    h, w = panels[0][1].shape[:2]
    scale = width / w
    cell_w, cell_h, title = round(w * scale), round(h * scale), 14
    rows = -(-len(panels) // columns)
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + title)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (name, picture) in enumerate(panels):
        x, y = (k % columns) * cell_w, (k // columns) * (cell_h + title)
        draw.text((x + 2, y + 1), name, fill="black")
        grid.paste(Image.fromarray(picture).resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y + title))
    task = TASKS[cfg.task]
    picture = with_legend(np.asarray(grid), list(task["class_names"]) + ["ignore"],
                          np.concatenate([task["palette"], np.zeros((1, 3), np.uint8)]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: Image.fromarray(picture).save(f, format="PNG"))
    return panels


LEGEND_FONT = ImageFont.load_default()
LEGEND_ROW = 14  # pixels per row of entries, at scale 1
LEGEND_SWATCH = 10
LEGEND_MIN_WIDTH = 160  # what a long class name (traffic light) and its swatch take
LEGEND_SCALE_WIDTH = 1024  # a strip k times this wide is drawn k times larger: it reads where the picture is shrunk


def legend_strip(class_names, palette, width, classes=None):
    """HxWx3 uint8, `width` wide, white: a swatch of each class's palette colour (a black outline) beside its name,
    left to right in as many rows as they need; classes: the ids to list (default all)."""
    scale = max(1, width // LEGEND_SCALE_WIDTH)
    inner = width // scale
    places, x, y = [], 4, 4
    for c in range(len(class_names)) if classes is None else classes:
        entry = LEGEND_SWATCH + 4 + round(LEGEND_FONT.getlength(class_names[c])) + 12
        if x > 4 and x + entry > inner:
            x, y = 4, y + LEGEND_ROW
        places.append((c, x, y))
        x += entry
    strip = Image.new("RGB", (inner, y + LEGEND_ROW + 4), "white")
    draw = ImageDraw.Draw(strip)
    for c, x, y in places:
        draw.rectangle([x, y + 1, x + LEGEND_SWATCH, y + 1 + LEGEND_SWATCH], fill=tuple(map(int, palette[c])),
                       outline="black")
        draw.text((x + LEGEND_SWATCH + 4, y), class_names[c], fill="black", font=LEGEND_FONT)
    strip = np.asarray(strip.resize((inner * scale, strip.height * scale), Image.Resampling.NEAREST))
    return np.pad(strip, ((0, 0), (0, width - strip.shape[1]), (0, 0)), constant_values=255)


def with_legend(picture, class_names, palette, classes=None):
    """The HxWx3 uint8 picture unchanged at the top left, legend_strip below it; a picture narrower than
    LEGEND_MIN_WIDTH gets white on its right."""
    height, width = picture.shape[:2]
    legend = legend_strip(class_names, palette, max(width, LEGEND_MIN_WIDTH), classes)
    out = np.full((height + len(legend), legend.shape[1], 3), 255, np.uint8)
    out[:height, :width] = picture
    out[height:] = legend
    return out
