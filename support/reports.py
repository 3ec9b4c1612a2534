"""What a run shows of itself: debug grids of one iteration (as DAFormer's and MIC's debug images show it, plus
MRM's view: the masked cells and what the decoder predicts from the rebuilt features), the class legend of every
picture of predictions, and eval.py's seed summaries and loss curves of runs."""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from support.base import DataError, atomic_write, one_line
from support.cli import FLAG_KEYS, RESUME_MAY_CHANGE
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


# ----------------------------------------------------------------------------- runs: logs, summary, curves

# Runs differing only in their seed and in settings that change how, not what, they train form one group.
NOT_THE_EXPERIMENT = {"seed", *RESUME_MAY_CHANGE}


def read_log(run_dir):
    """The records of run_dir/log.jsonl; unreadable lines (one being written, a crash) are skipped."""
    try:
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return []
    lines = [line for line in text.split("\n")[:-1] if line.strip()]  # the last piece is partial or empty
    try:  # one parse of the whole log, twice as fast as one per line
        records = json.loads("[" + ",".join(lines) + "]")
    except ValueError:
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("iteration"), (int, float))]


def read_config(run_dir):
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise DataError(f"{run_dir}: no config.json, expected the work dir of a training run")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable ({one_line(error)}); expected the work dir of a training run") from None
    if not isinstance(config, dict) or config.get("task") not in TASKS:
        raise DataError(f"{path}: not a config.json of train_dacs_mrm.py (no known task)")
    return config


def aligned(rows):
    """Rows of cells as text: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])
                     for row in rows)


def summary_cell(values, column):
    """The mean of the finite values ('' for none): a class's IoU to Table 1's one decimal, an mIoU to two with
    the sample standard deviation (ddof=1) of several runs."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return ""
    if not column.startswith("mIoU"):
        return f"{np.mean(values):.1f}"
    return f"{np.mean(values):.2f}" + (f" +- {np.std(values, ddof=1):.2f}" if len(values) > 1 else "")


def run_values(run, record, task, per_class):
    """A run's numbers in summary order: its mIoU, or per class the first class subset's IoUs, then the mean
    of each subset (the first is val_miou; nan where the records hold no val_iou)."""
    if not per_class:
        return [record["val_miou"]]
    subsets = list(task["eval_classes"].values())
    ious = record.get("val_iou")
    if not (isinstance(ious, list) and len(ious) == len(task["class_names"])):
        print(f"{run}: its validation records hold no per-class IoU (val_iou); only its mIoU is shown")
        return [math.nan] * len(subsets[0]) + [record["val_miou"]] + [math.nan] * (len(subsets) - 1)
    ious = np.array([math.nan if v is None else v for v in ious], float)
    return list(ious[list(subsets[0])]) + [record["val_miou"]] + [float(np.nanmean(ious[list(ids)]))
                                                                    for ids in subsets[1:]]


def not_a_seed(config, last):
    """Why a run's last validation record is not its final result ('' where it is): no mIoU, or a run that has
    not reached its iterations (config.json's iters)."""
    miou, iteration, iters = last["val_miou"], last["iteration"], config.get("iters")
    if type(miou) not in (int, float) or not math.isfinite(miou):
        return f"its last validation (iteration {iteration}) has no mIoU ({miou})"
    if isinstance(iters, int) and iteration < iters:
        return f"unfinished, last validated at iteration {iteration} of {iters} (mIoU {miou:.2f} so far)"
    return ""


def summarise_runs(run_dirs, per_class=False):
    """Print the last validation mIoU of each run and, per group of runs with the same configuration but for
    the seed, their mean +- sample standard deviation; per_class adds the per-class IoUs (the validation
    records' val_iou, in %) and their means. A run is counted once however often (or by whatever path) it is
    given; an unfinished run, or one whose last validation has no mIoU, is named on a line of its own, never
    counted as a seed."""
    groups, given = {}, {}
    for run in run_dirs:
        first = given.get(os.path.realpath(run))
        if first is not None:
            print(f"note: {run} given twice" + (f" (as {first})" if run != first else "") + ", counted once")
            continue
        given[os.path.realpath(run)] = run
        config = read_config(run)
        validations = [r for r in read_log(run) if "val_miou" in r]
        if not validations:
            print(f"{run}: no validation record in its log.jsonl; skipped")
            continue
        last = validations[-1]
        reason = not_a_seed(config, last)
        if reason:
            print(f"{run}: not counted: {reason}")
            continue
        key = json.dumps({k: v for k, v in config.items() if k not in NOT_THE_EXPERIMENT}, sort_keys=True)
        groups.setdefault(key, []).append((run, config, last))
    if not groups:
        raise DataError("no finished run with a validation mIoU: nothing to summarise")
    configs = [json.loads(key) for key in groups]
    shown = ["task", "arch", "recipe"] + [k for k in sorted(FLAG_KEYS) if k not in ("task", "arch", "recipe")
                                          and len({json.dumps(c.get(k)) for c in configs}) > 1]
    blocks = []
    for runs in groups.values():
        config = runs[0][1]
        task = TASKS[config["task"]]
        subsets = list(task["eval_classes"].items())  # the first is val_miou's
        names = [f"mIoU{name}" for name, _ in subsets[:1]]
        if per_class:
            names = [task["class_names"][c] for c in subsets[0][1]] + [f"mIoU{name}" for name, _ in subsets]
        rows, values = [["run", "seed", "iteration"] + names], []
        for run, run_config, record in runs:
            values.append(run_values(run, record, task, per_class))
            rows.append([run, str(run_config.get("seed", "")), str(record["iteration"])] +
                        [summary_cell([v], name) for v, name in zip(values[-1], names)])
        rows.append([f"mean +- std (n={len(runs)})" if len(runs) > 1 else "n=1", "", ""] +
                    [summary_cell(column, name) for column, name in zip(zip(*values), names)])
        blocks.append(" ".join(f"{k}={config.get(k)}" for k in shown) + "\n" + aligned(rows))
    for block in blocks:  # blank lines between groups, and after the lines about single runs
        print(f"\n{block}")


SERIES = ("loss_sup", "loss_uda", "loss_mrm", "loss_mic", "loss_fd", "pseudo_weight", "lr", "val_miou")
PANEL = (300, 180)  # pixels per panel
COLUMNS = 4
LEGEND_LINE = 14  # pixels per run in the legend below the panels
RUN_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))  # matplotlib's tab10
FONT = ImageFont.load_default()


def draw_panel(draw, left, top, title, lines):
    """One series: axes, title, y min/max and the iteration range, a polyline per run ((n, 2) iteration, value)."""
    x0, y0, x1, y1 = left + 56, top + 22, left + PANEL[0] - 12, top + PANEL[1] - 22
    points = np.concatenate(lines)
    (xmin, ymin), (xmax, ymax) = points.min(axis=0), points.max(axis=0)
    scale = np.array([(x1 - x0) / ((xmax - xmin) or 1), -(y1 - y0) / ((ymax - ymin) or 1)])
    draw.text((left + 8, top + 4), title, fill="black", font=FONT)
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    for text, y in ((f"{ymax:.3g}", y0), (f"{ymin:.3g}", y1 - 10)):
        draw.text((x0 - 4 - draw.textlength(text, font=FONT), y), text, fill="black", font=FONT)
    last = f"{xmax:.0f}"
    draw.text((x0, y1 + 4), f"{xmin:.0f}", fill="black", font=FONT)
    draw.text(((x0 + x1 - draw.textlength("iteration", font=FONT)) / 2, y1 + 4), "iteration", fill="gray", font=FONT)
    draw.text((x1 - draw.textlength(last, font=FONT), y1 + 4), last, fill="black", font=FONT)
    for k, line in enumerate(lines):
        xy = ((line - (xmin, ymin)) * scale + (x0, y1)).ravel().tolist()
        colour = RUN_COLOURS[k % len(RUN_COLOURS)]
        if len(xy) > 2:
            draw.line(xy, fill=colour, width=2)
        elif xy:  # a single record: a dot
            x, y = xy
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)


def series(records, name):
    """(n, 2) float array of (iteration, value) of the records where name is a finite number (loss_sup is also
    read from a record's loss_source)."""
    records = [{"loss_sup": r["loss_source"], **r} if "loss_source" in r else r for r in records]
    xy = np.array([(r["iteration"], r[name]) for r in records if type(r.get(name)) in (int, float)], float)
    xy = xy.reshape(-1, 2)
    return xy[np.isfinite(xy).all(axis=1)]


CURVES_SOFTWARE = "train_dacs_mrm.py curves"  # what a curves PNG says wrote it: only such a file may be replaced


def is_curves_png(path):
    """Whether path is a PNG that plot_curves wrote (its Software text)."""
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.text.get("Software") == CURVES_SOFTWARE
    except Exception:  # PIL raises many different exception types on other files
        return False


def plot_curves(run_dirs, path):
    """Write one PNG of every series in SERIES that some run logged non-zero: a panel each, a coloured line
    per run, a legend of the runs' folder names. Fast, and never fails on a short or partly written log
    (it draws what it can read). Returns the series drawn."""
    logs = [read_log(run) for run in run_dirs]
    curves = {}
    for name in SERIES:
        lines = [series(records, name) for records in logs]
        if any(line[:, 1].any() for line in lines):
            curves[name] = lines
    rows = max(1, -(-len(curves) // COLUMNS))
    image = Image.new("RGB", (COLUMNS * PANEL[0], rows * PANEL[1] + LEGEND_LINE * len(run_dirs) + 8), "white")
    draw = ImageDraw.Draw(image)
    if not curves:
        draw.text((8, 8), "no records yet", fill="black", font=FONT)
    for k, (name, lines) in enumerate(curves.items()):
        draw_panel(draw, (k % COLUMNS) * PANEL[0], (k // COLUMNS) * PANEL[1], name, lines)
    for k, run in enumerate(run_dirs):
        y = rows * PANEL[1] + 4 + LEGEND_LINE * k
        draw.line([(12, y + 7), (36, y + 7)], fill=RUN_COLOURS[k % len(RUN_COLOURS)], width=3)
        draw.text((44, y), os.path.basename(os.path.normpath(run)), fill="black", font=FONT)
    marker = PngImagePlugin.PngInfo()
    marker.add_text("Software", CURVES_SOFTWARE)
    atomic_write(path, lambda f: image.save(f, format="PNG", compress_level=1, pnginfo=marker))
    return list(curves)
