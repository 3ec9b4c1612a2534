"""Evaluate a trained segmentation model as the paper does; predict any images; write Cityscapes benchmark
files; summarise and plot training runs.

    python eval.py runs/gta2cs-dlv2-dacs-mrm-seed0/model.pth --data-root data   # val mIoU
    python eval.py CHECKPOINT --save-dir predictions                      # also write input|prediction PNGs
    python eval.py CHECKPOINT --images photos/ --out preds [--blend 0.5]  # <stem>_color.png, <stem>_trainid.png
    python eval.py CHECKPOINT --split test --format cityscapes --out results  # benchmark labelIds
    python eval.py runs/.../checkpoint.pth --export model.pth             # inference-only weights
    python eval.py OLDER_MODEL.pth --task syn2cs --export model.pth       # a file from before: record its task
    python eval.py --summary runs/gta2cs-*-seed* [--per-class]            # final mIoU per run, mean +- std
    python eval.py --plot runs/a runs/b --out curves.png                  # losses, lr, val mIoU per iteration

Whole-image inference at the training input size (Cityscapes: 1024x512; an HRDA model: 2048x1024 in
1024x1024 windows at stride 512, as HRDA's test_cfg, read from the checkpoint), logits resized bilinearly
(with the align_corners the model was trained with, recorded in the checkpoint) to the full-resolution
label (2048x1024) before the argmax: the mmseg protocol of DAFormer, MIC and MRM (images resized as
OpenCV does, without antialiasing). `--protocol dacs` resizes the images with PIL and the labels to
1024x512 instead, as DACS's own code does. The mIoU
sums intersections and unions over all images (one confusion matrix), ignoring label 255. Only the
segmentation model is loaded: a checkpoint's Rebuilder, teacher and optimiser are never read into it.
--images and --format predict the same way, each image at its own size as a viewer shows it (EXIF orientation;
16-bit and other modes converted by value), toy scenes as drawn (fit into 2048 pixels when larger), a side shorter
than the encoders' strides need (32 pixels) stretched to it. The colour pictures (--images' _color.png,
--save-dir's) carry a legend of the classes they show below the picture, whose pixels stay as they were;
_trainid.png holds the train ids alone. A model file
(model.pth, checkpoint.pth) records its task, class names, palette, label ids and input size (state["inference"]),
so no --task is needed; a --task that contradicts it is refused; files written before the record take --task.
Every PNG is written whole or not at all; Ctrl-C stops at once (exit 130, SIGTERM 143) without a half-written file.
"""
import argparse
import json
import math
import os
import pathlib
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageFont, ImageOps

from support.base import CorruptFile, DataError, atomic_write, format_eta, one_line
from support.cli import DEFAULT_WORKERS, FLAG_KEYS
from support.data import (CITYSCAPES_ID_TO_TRAIN, CLASSES, DATASETS, Domain, LABEL_NOTES, TASKS, LAYOUT,
                          ignore_stop_signals, list_pngs, mmseg_rescale_size, resize_pair)
from support.models import ARCHS, load_tensors
from support.networks import build_model
from support.reports import with_legend
from support.runs import RESUME_MAY_CHANGE, export_model, inference_record, load_checkpoint, load_model_state


@torch.no_grad()
def evaluate(model, domain, num_classes, device, align_corners, amp="off", protocol="mmseg", on_prediction=None,
             workers=0, say=None):
    """Confusion matrix over a labelled domain: the whole image at the training input size, logits
    resized bilinearly (with the align_corners the model was trained with) to the label (mmseg protocol:
    the full-resolution label; dacs: the label resized to the input size), argmax.
    on_prediction(i, image, prediction) sees every prediction; say (print) gets about ten progress lines. A
    corrupt image or label is skipped, as training skips them, with a line that names it."""
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    items = torch.utils.data.DataLoader(EvalImages(domain, protocol == "mmseg"), batch_size=None,
                                        num_workers=workers, worker_init_fn=ignore_stop_signals)
    autocast = torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16,
                              enabled=amp != "off")
    start, every = time.perf_counter(), max(1, len(domain) // 10)
    for i, item in enumerate(items):
        if "error" in item:
            raise DataError(item["error"])
        if "skipped" in item:
            print(f"skipped: {item['skipped']}", flush=True)
            continue
        image, label = item["image"], item["label"]
        if say is not None and i and i % every == 0:
            seconds = (time.perf_counter() - start) / i
            say(f"  evaluated {i}/{len(domain)} images, {seconds:.2f} s/image, ETA "
                f"{format_eta(seconds * (len(domain) - i))}", flush=True)
        x = image.to(device).permute(2, 0, 1)[None].float() / 255
        with autocast:
            logits = model(x)
        prediction = F.interpolate(logits.float(), size=label.shape, mode="bilinear",
                                   align_corners=align_corners).argmax(dim=1)[0]
        conf += confusion_matrix(prediction, label.to(device), num_classes)
        if on_prediction is not None:
            on_prediction(i, image.numpy(), prediction.to(torch.uint8).cpu().numpy())
    LABEL_NOTES.clear()  # unknown label ids are reported by training and --check-data --decode
    return conf


class EvalImages(torch.utils.data.Dataset):
    def __init__(self, domain, full_label):
        self.domain, self.full_label = domain, full_label

    def __len__(self):
        return len(self.domain)

    def __getitem__(self, i):
        """dict(image, label), or a problem as dict(skipped=...) (a corrupt file) or dict(error=...): raised in a
        loader worker, it would reach the user wrapped in the worker's traceback."""
        try:
            image, label = self.domain.load(i, full_label=self.full_label)
        except CorruptFile as error:
            return dict(skipped=str(error))
        except DataError as error:
            return dict(error=str(error))
        return dict(image=torch.from_numpy(image), label=torch.from_numpy(label))


def miou_report(conf, eval_classes, class_names):
    """The per-class table (paper Table 1 order) for each class subset, and the first subset's mIoU."""
    ious = iou_per_class(conf.cpu())
    tables = [f"mIoU over {name} classes:\n{format_table(ious, ids, class_names)}"
              for name, ids in eval_classes.items()]
    first = next(iter(eval_classes.values()))
    return "\n".join(tables), float(np.nanmean(np.asarray(ious)[list(first)]) * 100)


# evaluation
def confusion_matrix(pred, label, num_classes, ignore_index=255):
    """int64 (num_classes, num_classes) pixel counts, rows = ground truth, columns = prediction."""
    label = torch.as_tensor(label)
    pred = torch.as_tensor(pred, device=label.device)
    if pred.shape != label.shape:
        raise ValueError(f'prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape')
    label, pred = label.reshape(-1).long(), pred.reshape(-1).long()
    keep = label != ignore_index
    label, pred = label[keep], pred[keep]
    # an out-of-range id would silently land in a neighbouring cell of the flattened matrix
    if ((label < 0) | (label >= num_classes) | (pred < 0) | (pred >= num_classes)).any():
        raise ValueError(f'labels and predictions must be in [0, {num_classes}) or {ignore_index}')
    return torch.bincount(label * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_per_class(conf):
    """float64 IoU per class; nan for a class absent from both ground truth and prediction."""
    conf = torch.as_tensor(conf).double()
    hits = conf.diag()
    return hits / (conf.sum(0) + conf.sum(1) - hits)


def format_table(ious, class_ids, names=CLASSES):
    """Two aligned rows like the paper's Table 1: class names + mIoU, then IoU * 100 (mIoU = nanmean over
    class_ids)."""
    ious = torch.as_tensor(ious, dtype=torch.float64).cpu().numpy() * 100
    class_ids = list(class_ids)
    header = [names[i] for i in class_ids] + ['mIoU']
    values = [f'{v:.1f}' for v in list(ious[class_ids]) + [np.nanmean(ious[class_ids])]]
    widths = [max(len(name), 5) for name in header]
    return '\n'.join(' | '.join(cell.rjust(width) for cell, width in zip(row, widths)) for row in (header, values))


def load_segmentation_model(path, device="cpu"):
    """(model, number of classes, architecture record) from a training checkpoint or an export."""
    return model_from_state(read_model_file(path), path, device)


def read_model_file(path):
    """A training checkpoint's or an export's state, after checking that it holds a model eval.py can build."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state or "arch" not in state:
        raise DataError(f"{path}: not a checkpoint of train_dacs_mrm.py (no 'model' and 'arch' entries)")
    arch_record = state["arch"]
    deeplab = isinstance(arch_record, dict) and arch_record.get("arch", "").startswith("dlv2")
    needed = {"arch", "align_corners"} | ({"layers", "width", "style", "aspp_dilations", "decoder"} if deeplab
                                          else set())
    if not isinstance(arch_record, dict) or needed - arch_record.keys():
        raise DataError(f"{path}: written by an older train_dacs_mrm.py (its architecture record lacks "
                        f"{sorted(needed - set(arch_record or ()))}); retrain, or add them to state['arch']")
    if not isinstance(model_classes(state), int):
        raise DataError(f"{path}: not a checkpoint of train_dacs_mrm.py (no number of classes)")
    return state


def model_classes(state):
    """The number of classes of an export (num_classes) or of a training checkpoint (its config's)."""
    config = state.get("config")
    return state["num_classes"] if "num_classes" in state else \
        config.get("num_classes") if isinstance(config, dict) else None


def model_from_state(state, path, device="cpu"):
    """(model, number of classes, architecture record) of read_model_file's state."""
    arch_record, num_classes = state["arch"], model_classes(state)
    if arch_record["arch"] not in ARCHS:
        raise DataError(f"{path}: a model of architecture {arch_record['arch']!r}, which this version does not have "
                        f"({', '.join(ARCHS)})")
    try:
        model, _ = build_model(arch_record["arch"], num_classes, arch_record=arch_record)
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{path}: its architecture record {arch_record} cannot be built by this version "
                        f"({one_line(error)[:160]})") from None
    load_model_state(model, state["model"], path)
    return model.to(device).eval(), num_classes, arch_record


def model_task(state, task, path):
    """(task, the file's inference record or None). A model file records its task (state["inference"]); a --task
    that contradicts it is refused. A file written before (without the record) takes --task, or a training
    checkpoint's own (its config's)."""
    num_classes, record = model_classes(state), state.get("inference")
    if record is not None:
        check_inference_record(record, num_classes, path)
        if task and task != record["task"]:
            raise DataError(f"{path}: a model of task {record['task']}, not --task {task}: leave --task out, "
                            f"the model file knows its task")
        return record["task"], record
    config = state.get("config")
    saved = config.get("task") if isinstance(config, dict) else None
    if task and saved in TASKS and task != saved:
        raise DataError(f"{path}: a model of task {saved} (its training config), not --task {task}: leave --task out")
    task = task or saved
    if task not in TASKS:
        raise DataError(f"{path}: written before model files recorded their task: pass --task "
                        f"({', '.join(sorted(TASKS))}); --export with --task writes a file that records it")
    if num_classes != len(TASKS[task]["class_names"]):
        raise DataError(f"{path}: model predicts {num_classes} classes, task {task} has "
                        f"{len(TASKS[task]['class_names'])}")
    return task, None


def check_inference_record(record, num_classes, path):
    """A model file is untrusted input: its record must be what inference_record writes, for num_classes classes."""
    def ints(values, n, low, high):
        return isinstance(values, (list, tuple)) and len(values) == n and \
            all(type(v) is int and low <= v <= high for v in values)

    if not isinstance(record, dict):
        raise DataError(f"{path}: its inference record is not a dict; pass --task and re-export it with --export")
    names, palette = record.get("class_names"), record.get("palette")
    checks = (("task", isinstance(record.get("task"), str)), ("target", isinstance(record.get("target"), str)),
              ("class_names", isinstance(names, (list, tuple)) and len(names) == num_classes
               and all(isinstance(name, str) for name in names)),
              ("palette", isinstance(palette, (list, tuple)) and len(palette) == num_classes
               and all(ints(colour, 3, 0, 255) for colour in palette)),
              ("label_ids", record.get("label_ids") is None or ints(record.get("label_ids"), num_classes, 0, 255)),
              ("size", record.get("size") is None or ints(record.get("size"), 2, 1, 1 << 16)),
              ("align_corners", isinstance(record.get("align_corners"), bool)))
    bad = [key for key, ok in checks if not ok]
    if bad:
        raise DataError(f"{path}: its inference record is damaged or of another version ({', '.join(bad)} "
                        f"missing or not for a model of {num_classes} classes)")


def prediction_writer(save_dir, domain, palette, class_names):
    """Writes <name>.png: the input image beside its colour prediction, a legend of the classes it shows below."""
    def write(i, image, prediction):
        name = (os.path.splitext(os.path.basename(domain.pairs[i][0]))[0] if hasattr(domain, "pairs")
                else f"{domain.name}_{i:05d}")
        colour = palette[prediction]
        if colour.shape[:2] != image.shape[:2]:  # mmseg protocol: full-resolution prediction
            colour = np.asarray(Image.fromarray(colour).resize(image.shape[1::-1], Image.NEAREST))
        write_png(os.path.join(save_dir, name + ".png"), with_legend(np.concatenate([image, colour], axis=1),
                                                                     class_names, palette,
                                                                     present_classes(prediction, palette)))

    return write


def write_png(path, array):
    """Whole or not at all (atomic_write), an interrupt included."""
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


# ----------------------------------------------------------------------------- predictions for image files

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CITYSCAPES_SPLIT_SIZES = {"test": 1525, "val": 500}  # the official leftImg8bit splits
LABELLED = np.flatnonzero(CITYSCAPES_ID_TO_TRAIN != 255)
TRAIN_TO_CITYSCAPES_ID = np.zeros(256, np.uint8)  # the benchmark's labelIds; train ids are 0..18, 0 elsewhere
TRAIN_TO_CITYSCAPES_ID[CITYSCAPES_ID_TO_TRAIN[LABELLED]] = LABELLED


def list_images(where):
    """Sorted PNG and JPEG files of a folder (not its subfolders) or of a glob pattern: regular files (or links to
    them) only, so that a FIFO or a device never blocks the listing or the reading."""
    paths = [os.path.join(where, name) for name in os.listdir(where)] if os.path.isdir(where) else \
        expand_glob(where)
    paths = sorted(p for p in paths if p.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(p))
    if not paths:
        raise DataError(f"{where}: no PNG or JPEG images matched")
    stems = {}
    for path in paths:  # a.png and a.jpg would write the same output files
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            raise DataError(f"{path} and {stems[stem]}: the same name, their predictions would overwrite each other")
        stems[stem] = path
    return paths


def expand_glob(pattern):
    """The paths a glob pattern matches; its ** never enters a linked folder (glob.glob's would go round a link to a
    parent folder until the path grows too long)."""
    parts = pathlib.PurePath(pattern).parts
    fixed = next((k for k, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    if fixed == len(parts):
        return [pattern] if os.path.lexists(pattern) else []
    rest = parts[fixed:] + (("*",) if parts[-1] == "**" else ())  # pathlib's final ** matches folders only
    return [str(path) for path in pathlib.Path(*parts[:fixed]).glob(str(pathlib.PurePath(*rest)))]


def read_viewed_image(path):
    """HxWx3 uint8 RGB of an image file as a viewer shows it: turned by its EXIF orientation, 16-bit and other
    modes converted by value (16-bit: the high byte, not clipped at 255), transparency laid over white."""
    try:
        with Image.open(path) as image:
            image.load()
            viewed = ImageOps.exif_transpose(image)
    except Exception as error:  # PIL raises many different exception types on damaged files
        raise CorruptFile(path, error) from error
    return rgb_by_value(viewed)


def rgb_by_value(image):
    if image.mode == "F" or image.mode.startswith("I"):  # one channel of 16 or 32 bits: PIL's convert would clip
        values = np.asarray(image)
        if image.mode == "F":  # floats have no nominal range: their own
            low, high = float(values.min()), float(values.max())
            grey = ((values - low) * (255 / ((high - low) or 1))).round().astype(np.uint8)
        else:  # integers: 16 bits (PNG's deepest), as Pillow opens 16-bit grey PNGs
            grey = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
    return np.array(image.convert("RGB"))  # writable, as torch wants it


# Model inputs: an image no model was trained at the size of (size None: toy scenes, used as drawn) larger than
# MAX_SIDE is resized to fit it; every side is then at least the encoder's MIN_SIDE.
MAX_SIDE = 2048
MIN_SIDE = 32  # MiT's coarsest spatial reduction (stride 32) needs one cell; ResNets take any size
LOGITS_BUDGET = 2 ** 26  # floats (256 MiB) of full-size logits held at once; a bigger picture is argmaxed in bands
BLEND_ROWS = 256  # --blend: the float copies of a band of rows, not of a whole big picture


def input_transform(record, protocol, arch_record):
    """(size, dacs_filter, min_side) of model_input for images as training resized the target's, by the model file's
    inference record (its size: the target's training size at the model's resolution); size None: toy scenes,
    used as drawn. HRDA's context view, at context_scale of the input, needs MIN_SIDE itself."""
    hrda = arch_record.get("hrda")
    min_side = math.ceil(MIN_SIDE / hrda["context_scale"]) if hrda else \
        1 if arch_record["arch"].startswith("dlv2") else MIN_SIDE
    if record["size"] is None:
        return None, None, min_side
    dacs = protocol == "dacs" and record["target"] in DATASETS
    return tuple(record["size"]), DATASETS[record["target"]]["dacs_filter"] if dacs else None, min_side


def model_input(image, size, dacs_filter, min_side):
    """The HxWx3 uint8 image as the model takes it: resized by resize_pair's rules (dacs_filter: exactly size; else
    fit into size keeping the aspect ratio; size None: as drawn, or fit into MAX_SIDE), then a side shorter than
    min_side stretched to it (a side that short holds too few pixels for its shape to matter)."""
    if dacs_filter is not None:
        image = resize_pair(image, None, size, dacs_filter, False)[0]
    height, width = image.shape[:2]
    if dacs_filter is None and (size is not None or max(height, width) > MAX_SIDE):
        width, height = mmseg_rescale_size(width, height, size or (MAX_SIDE, MAX_SIDE))
    height, width = max(height, min_side), max(width, min_side)
    if (height, width) == image.shape[:2]:
        return image
    # resize_pair's mmseg resize, here also where an extreme aspect ratio rounds a side to 0
    return TF.resize(torch.from_numpy(image).permute(2, 0, 1), [height, width], TF.InterpolationMode.BILINEAR,
                     antialias=False).permute(1, 2, 0).numpy()


class ImageBatches(torch.utils.data.Dataset):
    """Item b: (paths, images as viewed, their model inputs, the corrupt files skipped) of batch b; images of one
    stored size share batches. `skipped` names the files whose header is unreadable."""

    def __init__(self, paths, size, dacs_filter, min_side, batch_size):
        self.size, self.dacs_filter, self.min_side, self.skipped = size, dacs_filter, min_side, []
        groups = {}
        for path in paths:
            try:
                with Image.open(path) as image:  # reads the header only
                    groups.setdefault(image.size, []).append(path)
            except Exception as error:  # PIL raises many different exception types on damaged files
                self.skipped.append(str(CorruptFile(path, error)))
        self.batches = [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, b):
        paths, images, skipped = [], [], []
        for path in self.batches[b]:
            try:
                images.append(read_viewed_image(path))
                paths.append(path)
            except CorruptFile as error:  # raised in a loader worker, it would come wrapped in a traceback
                skipped.append(str(error))
        inputs = [model_input(image, self.size, self.dacs_filter, self.min_side) for image in images]
        return paths, images, inputs, skipped


@torch.no_grad()
def predict_files(model, paths, transform, device, align_corners, write, amp="off", batch_size=4, workers=0):
    """Train ids of every image at its own size (as viewed): its model input (model_input, by transform:
    input_transform), logits resized back bilinearly, argmax; write(path, image, prediction) gets each. About ten
    progress lines; a corrupt file is skipped with a line naming it. Returns the number of images skipped."""
    batches = ImageBatches(paths, *transform, batch_size)
    autocast = torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16,
                              enabled=amp != "off")
    for message in batches.skipped:
        print(f"skipped: {message}", flush=True)
    start, done, every, skipped = time.perf_counter(), len(batches.skipped), max(1, len(paths) // 10), 0
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers,
                                         worker_init_fn=ignore_stop_signals)
    for names, images, inputs, problems in loader:
        for message in problems:
            print(f"skipped: {message}", flush=True)
        skipped, done = skipped + len(problems), done + len(problems)
        shapes = {}  # images of one stored size may differ as viewed (their EXIF orientations)
        for k, x in enumerate(inputs):
            shapes.setdefault(tuple(x.shape), []).append(k)
        for same in shapes.values():
            x = torch.stack([inputs[k] for k in same]).to(device).permute(0, 3, 1, 2).float() / 255
            with autocast:
                logits = model(x)
            for k, logit in zip(same, logits):
                prediction = full_size_argmax(logit.float(), images[k].shape[:2], align_corners)
                write(names[k], images[k].numpy(), prediction.cpu().numpy())
        done, before = done + len(names), done
        if done < len(paths) and done // every > before // every:
            seconds = (time.perf_counter() - start) / done
            print(f"  predicted {done}/{len(paths)} images, {seconds:.2f} s/image, ETA "
                  f"{format_eta(seconds * (len(paths) - done))}", flush=True)
    return skipped + len(batches.skipped)


def full_size_argmax(logits, size, align_corners):
    """HxW uint8 argmax of (C, h, w) logits resized bilinearly to size (H, W). Where the (C, H, W) logits would
    hold more than LOGITS_BUDGET floats: resized across first (C, h, W), then down a band of columns at a time
    (the same bilinear weights; the sums may differ from one resize's in their last bit)."""
    channels, height, width = logits.shape[0], *size
    if channels * height * width <= LOGITS_BUDGET:
        return F.interpolate(logits[None], size=size, mode="bilinear",
                             align_corners=align_corners).argmax(dim=1)[0].to(torch.uint8)
    across = F.interpolate(logits[None], size=(logits.shape[1], width), mode="bilinear", align_corners=align_corners)
    band = max(1, LOGITS_BUDGET // (channels * height))
    ids = torch.empty(size, dtype=torch.uint8, device=logits.device)
    for left in range(0, width, band):
        columns = across[..., left:left + band]
        ids[:, left:left + band] = F.interpolate(columns, size=(height, columns.shape[-1]), mode="bilinear",
                                                 align_corners=align_corners).argmax(dim=1)[0]
    return ids


def image_writer(out, palette, blend, class_names):
    """Writes <stem>_color.png (palette colours, at alpha blend over the image, the picture unchanged at the top
    left and a legend of the classes it shows below it) and <stem>_trainid.png (the train ids alone)."""
    def write(path, image, prediction):
        stem = os.path.join(out, os.path.splitext(os.path.basename(path))[0])
        colour = palette[prediction]
        if blend < 1:
            for top in range(0, len(colour), BLEND_ROWS):
                rows = slice(top, top + BLEND_ROWS)
                colour[rows] = (blend * colour[rows] + (1 - blend) * image[rows]).round()
        write_png(stem + "_color.png", with_legend(colour, class_names, palette, present_classes(prediction, palette)))
        write_png(stem + "_trainid.png", prediction)

    return write


def present_classes(prediction, palette):
    """The train ids a prediction holds: its legend lists only them, so that it also tells which classes the
    picture holds where they cover a few pixels, and stays short."""
    return np.flatnonzero(np.bincount(prediction.ravel(), minlength=len(palette)))


def cityscapes_writer(out, image_dir, label_ids=None):
    """Writes out/CITY/<name>_leftImg8bit.png in Cityscapes labelIds (label_ids: the label id of each train id, as
    the model file records them; default Cityscapes'), the names the benchmark server expects."""
    table = TRAIN_TO_CITYSCAPES_ID
    if label_ids is not None:
        table = np.zeros(256, np.uint8)
        table[:len(label_ids)] = label_ids

    def write(path, image, prediction):
        target = os.path.join(out, os.path.relpath(path, image_dir))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        write_png(target, table[prediction])

    return write


def cityscapes_images(data_root, split):
    """(folder, sorted image paths) of leftImg8bit/<split>; no labels needed (the test split has none)."""
    layout = LAYOUT["cityscapes"]
    folder = os.path.join(data_root, layout["images"].format(split=split))
    images = list_pngs(folder, layout["image_re"], None, layout["naming"][0])
    if not images:
        raise DataError(f"{folder}: no images found, expected files named {layout['naming'][0]}")
    if len(images) != CITYSCAPES_SPLIT_SIZES[split]:
        print(f"warning: {folder} holds {len(images)} images, the official {split} split has "
              f"{CITYSCAPES_SPLIT_SIZES[split]}: the benchmark needs all of them", file=sys.stderr)
    return folder, [images[key] for key in sorted(images)]


# ----------------------------------------------------------------------------- safety of what is written

def check_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise DataError(f"--device {name}: unknown device, expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DataError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def check_outside_data(path, flag, data_root):
    data = os.path.realpath(data_root)
    if os.path.commonpath([os.path.realpath(path), data]) == data:
        raise DataError(f"{flag} {path}: inside --data-root {data_root}; write outside the dataset")


# What a training run writes and only it may replace, whatever --overwrite says
RUN_OWNED = ("checkpoint.pth", "log.jsonl", "config.json", "model.pth", ".lock")


def check_output_dir(path, flag, data_root, overwrite, inputs=()):
    """A folder for predictions: not a file, not inside the dataset, holding none of the `inputs` and no training
    run, empty unless overwrite."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"{flag} {path}: an existing file, expected a folder")
    check_outside_data(path, flag, data_root)
    folder = os.path.realpath(path)
    held = [p for p in inputs if os.path.commonpath([os.path.realpath(p), folder]) == folder]
    if held:
        raise DataError(f"{flag} {path}: holds the input {held[0]}; write the predictions to another folder")
    owned = [name for name in RUN_OWNED if os.path.exists(os.path.join(path, name))]
    if owned:
        raise DataError(f"{flag} {path}: the work dir of a training run ({', '.join(owned)}); write elsewhere")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise DataError(f"{flag} {path}: not empty; pass --overwrite to write into it")


def check_output_file(path, flag, data_root, overwrite, reading=None, replaces=None):
    """A file to write: not a folder, not inside the dataset, not the file being read, not a training run's own
    file, new unless overwrite, and then only replacing a file that replaces(path) recognises as one this command
    writes."""
    if os.path.isdir(path):
        raise DataError(f"{flag} {path}: an existing folder, expected a file name")
    check_outside_data(path, flag, data_root)
    if reading is not None and os.path.realpath(path) == os.path.realpath(reading):
        raise DataError(f"{flag} {path}: is the checkpoint being read; write to another file")
    if not os.path.exists(path):
        return
    if not overwrite:
        raise DataError(f"{flag} {path}: exists; pass --overwrite to replace it")
    if os.path.basename(path) in RUN_OWNED or (replaces is not None and not replaces(path)):
        raise DataError(f"{flag} {path}: exists and is not a file this command writes; --overwrite never replaces "
                        f"it: choose another name")


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def is_export(path):
    """Whether path holds an inference-only model file (--export's or a run's export), not a training checkpoint."""
    try:
        state = load_tensors(path)
    except ValueError:
        return False
    return isinstance(state, dict) and {"arch", "model"} <= state.keys() and "optimizers" not in state


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
    atomic_write(path, lambda f: image.save(f, format="PNG", compress_level=1))
    return list(curves)


# ----------------------------------------------------------------------------- command line

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default="", metavar="CHECKPOINT",
                        help="checkpoint.pth or model.pth written by train_dacs_mrm.py (not for --summary, --plot)")
    parser.add_argument("--task", choices=sorted(TASKS), default=None,
                        help="whose val split, classes and input size (default: the task the model file records; "
                             "needed only for files written before model files recorded it)")
    parser.add_argument("--data-root", default="data", metavar="PATH",
                        help="folder holding cityscapes/ (default data)")
    parser.add_argument("--protocol", choices=["mmseg", "dacs"], default="mmseg",
                        help="mmseg: images resized keeping their aspect ratio, full-resolution labels (DAFormer, MIC, "
                             "MRM); dacs: images resized with PIL to exactly 1024x512, labels too (default mmseg)")
    parser.add_argument("--save-dir", default="", metavar="PATH",
                        help="write input|prediction PNGs of the val split here, a class legend below (default: "
                             "none)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow writing into a non-empty --save-dir / --out, or over an --export or --plot file "
                             "(default off)")
    parser.add_argument("--export", default="", metavar="PATH",
                        help="write an inference-only model file here and exit (default: none)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                        help="autocast precision (default off: fp32)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                        help=f"image loading processes (default: one per core up to 4, here {DEFAULT_WORKERS})")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="toy task: the seed of its scenes (default 0)")
    parser.add_argument("--images", default="", metavar="DIR|GLOB",
                        help="predict these PNG/JPEG images (a folder or a glob pattern; ** does not enter linked "
                             "folders) as a viewer shows them into --out (default: none)")
    parser.add_argument("--out", default="", metavar="PATH",
                        help="folder for --images / --format predictions, PNG file for --plot (default: none)")
    parser.add_argument("--blend", type=float, default=1.0, metavar="A",
                        help="--images: alpha of the colours over the image, 1 colours only (default 1)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N",
                        help="--images / --format: images per forward pass where their sizes agree (default 4)")
    parser.add_argument("--format", choices=["cityscapes"], default="",
                        help="write the Cityscapes --split as benchmark labelIds PNGs into --out (default: off)")
    parser.add_argument("--split", choices=sorted(CITYSCAPES_SPLIT_SIZES), default="val",
                        help="--format cityscapes: which leftImg8bit split (default val)")
    parser.add_argument("--summary", nargs="+", default=[], metavar="RUN_DIR",
                        help="print each run's last validation mIoU and mean +- std per configuration, each run "
                             "counted once; unfinished runs and runs without a final mIoU are named, not counted "
                             "(default: off)")
    parser.add_argument("--per-class", action="store_true", help="--summary: also the per-class IoUs (default off)")
    parser.add_argument("--plot", nargs="+", default=[], metavar="RUN_DIR",
                        help="draw the runs' logged curves into the PNG --out (default: off)")
    return parser


def check_flags(args):
    """Refuse, in one line, flags that belong to another mode or are missing."""
    modes = [flag for flag, given in (("--summary", args.summary), ("--plot", args.plot), ("--images", args.images),
                                      ("--format", args.format), ("--export", args.export)) if given]
    if len(modes) > 1:
        raise DataError(f"{modes[0]} and {modes[1]} are different modes: give one")
    writes_out = args.plot or args.images or args.format
    if args.out and not writes_out:
        raise DataError("--out is where --images, --format and --plot write; the val evaluation takes --save-dir")
    if writes_out and not args.out:
        raise DataError(f"{modes[0]} needs --out")
    if args.save_dir and modes:
        raise DataError(f"--save-dir is for the val evaluation; {modes[0]} writes into --out")
    if args.split != "val" and not args.format:
        raise DataError(f"--split {args.split}: only --format cityscapes predicts it (it has no labels)")
    if not (args.checkpoint or args.summary or args.plot):
        raise DataError("give a CHECKPOINT (only --summary and --plot work without one)")
    if not 0 <= args.blend <= 1 or args.batch_size < 1:
        raise DataError("--blend must be within [0, 1] and --batch-size at least 1")


def run_model(args):
    """--export, --images, --format, or the val evaluation: every check before the first file is written. The
    task, classes, palette, label ids and input size come from the model file (--task only for older files)."""
    device = check_device(args.device)
    if args.export:
        check_output_file(args.export, "--export", args.data_root, args.overwrite, args.checkpoint, is_export)
    state = read_model_file(args.checkpoint)
    name, record = model_task(state, args.task, args.checkpoint)
    target = record["target"] if record else TASKS[name]["target"]
    if args.format and (target != "cityscapes" or record and record["label_ids"] is None):
        raise DataError(f"--format cityscapes: task {name} is not evaluated on Cityscapes")
    if not (args.export or args.images or args.format) and name not in TASKS:
        raise DataError(f"{args.checkpoint}: a model of task {name}, which this eval.py does not know: it can "
                        f"predict --images, not evaluate its val split")
    paths = []
    if args.images:
        paths = list_images(args.images)
    elif args.format:
        image_dir, paths = cityscapes_images(args.data_root, args.split)
    for flag, folder in (("--out", args.out), ("--save-dir", args.save_dir)):
        if folder:
            check_output_dir(folder, flag, args.data_root, args.overwrite, paths + [args.checkpoint])
    model, num_classes, arch_record = model_from_state(state, args.checkpoint, device)
    record = record or inference_record(name, arch_record, model)
    if args.export:
        export_model(args.export, model, arch_record, num_classes, inference=record)
        print(f"wrote {args.export}: {arch_record['arch']}, {num_classes} classes of task {name}, no Rebuilder")
        return
    palette = np.asarray(record["palette"], np.uint8)
    start = time.perf_counter()
    if args.images or args.format:
        os.makedirs(args.out, exist_ok=True)
        write = (image_writer(args.out, palette, args.blend, record["class_names"]) if args.images else
                 cityscapes_writer(args.out, image_dir, record["label_ids"]))
        skipped = predict_files(model, paths, input_transform(record, args.protocol, arch_record), device,
                                arch_record["align_corners"], write, args.amp, args.batch_size, args.workers)
        what = ("colour and train-id PNGs" if args.images else
                f"Cityscapes {args.split} labelIds PNGs, CITY/CITY_NNNNNN_NNNNNN_leftImg8bit.png,")
        print(f"wrote {len(paths) - skipped} {what} to {args.out} in {time.perf_counter() - start:.1f} s on {device}"
              + (f"; {skipped} corrupt file(s) skipped (named above)" if skipped else ""))
        return
    task = TASKS[name]
    val = Domain(task["target"], args.data_root, "val", args.seed, framework=args.protocol,
                 resolution=arch_record.get("resolution", 1))
    writer = None
    if args.save_dir:
        os.makedirs(args.save_dir, exist_ok=True)
        writer = prediction_writer(args.save_dir, val, palette, record["class_names"])
    conf = evaluate(model, val, num_classes, device, arch_record["align_corners"], args.amp, args.protocol, writer,
                    args.workers, say=print)
    seconds = time.perf_counter() - start
    if not conf.sum():
        raise DataError(f"no labelled pixel in the {len(val)} {task['target']} val labels (all 255): "
                        f"the mIoU is undefined")
    table, _ = miou_report(conf, task["eval_classes"], task["class_names"])
    print(f"{args.checkpoint} on {len(val)} {task['target']} val images ({args.protocol} protocol), "
          f"{seconds:.1f} s on {device} ({1000 * seconds / len(val):.1f} ms/image, loading included):\n{table}")


class Terminated(Exception):
    """SIGTERM, raised where the program is, as Ctrl-C raises KeyboardInterrupt."""


def on_sigterm(signum, frame):
    raise Terminated


def main(argv=None):
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        check_flags(args)
        if args.summary:
            summarise_runs(args.summary, args.per_class)
        elif args.plot:
            if not args.out.lower().endswith(".png"):
                raise DataError(f"--out {args.out}: --plot draws a PNG; name it NAME.png")
            check_output_file(args.out, "--out", args.data_root, args.overwrite, replaces=is_png)
            for run in args.plot:
                if not os.path.isfile(os.path.join(run, "log.jsonl")):
                    raise DataError(f"{run}: no log.jsonl, expected the work dir of a training run")
            drawn = plot_curves(args.plot, args.out)
            print(f"wrote {args.out}: {len(drawn)} series of {len(args.plot)} run(s)")
        else:
            run_model(args)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as stop:
        interrupted = isinstance(stop, KeyboardInterrupt)
        print(f"{'interrupted' if interrupted else 'terminated'}: stopped at once; nothing is left half-written, "
              f"the files written so far are complete", file=sys.stderr)
        return 128 + (signal.SIGINT if interrupted else signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
