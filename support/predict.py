"""Predictions of image files: --images (any PNG or JPEG, read as a viewer shows it, at a bounded size) and
--format cityscapes (the benchmark's labelIds), for eval.py."""
import math
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps

from support.base import CorruptFile, DataError, atomic_write, format_eta
from support.data import (CITYSCAPES_ID_TO_TRAIN, DATASETS, LAYOUT, ignore_stop_signals, list_pngs,
                          mmseg_rescale_size, resize_pair)
from support.reports import with_legend


def write_png(path, array):
    """Whole or not at all (atomic_write), an interrupt included."""
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


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
