"""Datasets as the official loaders read them: the label tables and tasks, folder layouts, decoding and
validating PNGs, resizing, random crops, the training batches (a pure function of seed and iteration), rare
class sampling, the pseudo-label margins, fake datasets for tests, and --check-data."""
import atexit
import contextlib
import json
import multiprocessing
import os
import re
import signal
import stat
import struct
import time
import warnings
import zlib

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_png, read_file
from PIL import Image

from support.base import CorruptFile, DataError, atomic_write, format_eta
from support.toy import TOY_CLASSES, TOY_PALETTE, make_toy_scene


TOY_SIZES = {"train": 2000, "val": 200}  # scenes per toy split: a finite target set, as in real UDA


# Label tables: the 19 Cityscapes classes in train-id order (cityscapesscripts labels.py), Table 1's order.
CLASSES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
           'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train', 'motorbike',
           'bicycle')


PALETTE = np.array([(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
                    (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)


SYNTHIA_16 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)  # no terrain, truck, train


SYNTHIA_13 = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)  # additionally no wall, fence, pole


TASKS = {
    "gta2cs": dict(source="gta", target="cityscapes", arch="dlv2", class_names=CLASSES, palette=PALETTE,
                   eval_classes={"19": tuple(range(19))}),
    "syn2cs": dict(source="synthia", target="cityscapes", arch="dlv2", class_names=CLASSES, palette=PALETTE,
                   eval_classes={"16": SYNTHIA_16, "13": SYNTHIA_13}),
    "toy": dict(source="toy-source", target="toy-target", arch="dlv2-tiny", recipe="toy", class_names=TOY_CLASSES,
                palette=TOY_PALETTE, eval_classes={str(len(TOY_CLASSES)): tuple(range(len(TOY_CLASSES)))}),
}


# Rare class sampling
def rcs_class_probabilities(class_pixel_counts, temperature=0.01):
    """p(c) = softmax((1 - f_c) / T), f_c = class pixel share (ignore 255 not counted by the caller).
    Returns a float64 numpy array."""
    counts = np.asarray(class_pixel_counts, dtype=np.float64)
    logits = (1.0 - counts / counts.sum()) / temperature
    p = np.exp(logits - logits.max())  # shift for numerical stability
    return p / p.sum()


def rcs_pick(rng, probs, images_per_class):
    """Sample a class by probs, then uniformly one source image holding enough pixels of it."""
    # our choice: a class without any qualifying image gets probability 0, the rest is renormalised
    p = np.asarray(probs, dtype=np.float64) * np.array([len(imgs) > 0 for imgs in images_per_class])
    if p.sum() == 0:
        raise ValueError('rcs_pick: no class has a qualifying source image')
    c = int(rng.choice(len(p), p=p / p.sum()))
    return c, int(images_per_class[c][rng.integers(len(images_per_class[c]))])


def crop_has_enough(label_crop, cls, min_pixels=1500):
    """The data loader re-crops (up to 10 times) until this holds."""
    return int((label_crop == cls).sum()) > min_pixels


# target_valid, 1 where a target pixel's pseudo-label may count, comes only with --pseudo-margins
BATCH_KEYS = ("source_image", "source_label", "target_image", "target_valid")


def to_device(batch, nets):
    """The batch's uint8 images and labels, as they are, on the device."""
    return [batch[key].to(nets.device, non_blocking=True) for key in BATCH_KEYS if key in batch]


def step_inputs(nets, source_image, source_label, target_image, target_valid=None):
    """uint8 images -> float RGB in [0, 1], labels -> int64, the pseudo-label mask -> float: on the device."""
    def image(t):
        return t.float().div_(255).contiguous(memory_format=nets.memory_format)
    valid = None if target_valid is None else target_valid.float()
    return image(source_image), source_label.long(), image(target_image), valid


# Cityscapes label ids of the 19 evaluated classes, in train-id order (cityscapesscripts labels.py)
CITYSCAPES_ID_TO_TRAIN = np.full(256, 255, dtype=np.uint8)


CITYSCAPES_ID_TO_TRAIN[[7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]] = np.arange(19)


# SYNTHIA ids are stored in 16 bits; ids of classes SYNTHIA lacks (16 terrain, 18 truck, 20 train) stay 255
SYNTHIA_ID_TO_TRAIN = np.full(65536, 255, dtype=np.uint8)


for _raw, _train in {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13,
                     19: 15, 12: 17, 11: 18}.items():
    SYNTHIA_ID_TO_TRAIN[_raw] = _train


# Training sizes (w, h). DACS resizes to exactly this size with PIL (GTA and SYNTHIA bicubic, Cityscapes
# bilinear); mmseg keeps the aspect ratio to fit it (a 1914x1052 GTA image becomes 1280x704).
DATASETS = {'gta': dict(size=(1280, 720), dacs_filter=Image.Resampling.BICUBIC),
            'cityscapes': dict(size=(1024, 512), dacs_filter=Image.Resampling.BILINEAR),
            'synthia': dict(size=(1280, 760), dacs_filter=Image.Resampling.BICUBIC)}


# folder discovery. Under ROOT: image and label folders; name patterns are regexes over the path relative
# to the folder whose group 1 pairs an image with its label; 'naming' is what error messages show.
_CITY = r'(([a-z][\w-]*)/\2_\d{6}_\d{6})'


LAYOUT = {
    'gta': dict(images='gta/images', labels='gta/labels', image_re=r'(\d{5})\.png', label_re=r'(\d{5})\.png',
                naming=('NNNNN.png', 'NNNNN.png'),
                skip_re=r'\d{5}_labelTrainIds\.png'),  # written by DAFormer's converter; we map ids on the fly
    'synthia': dict(images='synthia/RGB', labels='synthia/GT/LABELS', image_re=r'(\d{7})\.png',
                    label_re=r'(\d{7})\.png', naming=('NNNNNNN.png', 'NNNNNNN.png'),
                    skip_re=r'\d{7}_labelTrainIds\.png'),
    'cityscapes': dict(images='cityscapes/leftImg8bit/{split}', labels='cityscapes/gtFine/{split}',
                       image_re=_CITY + r'_leftImg8bit\.png', label_re=_CITY + r'_gtFine_labelIds\.png',
                       naming=('CITY/CITY_NNNNNN_NNNNNN_leftImg8bit.png',
                               'CITY/CITY_NNNNNN_NNNNNN_gtFine_labelIds.png'),
                       skip_re=r'[^/]+/[^/]+_gtFine_(color|instanceIds|labelTrainIds)\.png'),
}


class Domain:
    """One dataset, indexable: load(i) -> (uint8 HxWx3 RGB image, uint8 HxW train-id label), already
    resized as `framework` resizes ("dacs" or "mmseg", see resize_pair) to DATASETS' size times `resolution`.
    Folder datasets read files; the toy domains draw scene i (as drawn, whatever the resolution)."""

    def __init__(self, name, root="data", split="train", seed=0, framework="mmseg", resolution=1):
        self.name = name
        if name.startswith("toy-"):
            self.style = name[4:]
            self.count = TOY_SIZES[split]
            self.seed = (seed, 0 if split == "train" else 1, 0 if self.style == "source" else 1)
        else:
            self.pairs = find_pairs(name, root, split)
            self.count = len(self.pairs)
            self.size = tuple(side * resolution for side in DATASETS[name]["size"])
            self.dacs_filter = DATASETS[name]["dacs_filter"] if framework == "dacs" else None

    @classmethod
    def of_run(cls, cfg, name, split, framework="mmseg"):
        """The domain a run reads: only a folder dataset reads --data-root and --resolution (a run warns of the
        flags it never read)."""
        if name.startswith("toy-"):
            return cls(name, split=split, seed=cfg.seed)
        return cls(name, cfg.data_root, split, cfg.seed, framework, cfg.resolution)

    def __len__(self):
        return self.count

    def load(self, i, full_label=False, with_label=True):
        """full_label: keep the label at its original size (the mmseg evaluation protocol). with_label=False: the
        label is all ignore (255), not read."""
        if self.name.startswith("toy-"):
            return make_toy_scene(np.random.default_rng([*self.seed, i]), self.style)
        image = read_image(self.pairs[i][0])
        if not with_label:
            return resize_pair(image, np.full(image.shape[:2], 255, np.uint8), self.size, self.dacs_filter)
        label = self.full_label(i)
        (h, w), (lh, lw) = image.shape[:2], label.shape
        # GTA's few documented image/label size mismatches are a few pixels; resize_pair gives the label the
        # image's size
        if (h, w) != (lh, lw) and not (self.name == "gta" and abs(lh - h) <= 0.05 * h and abs(lw - w) <= 0.05 * w):
            raise BadLabel(self.pairs[i][1], self.name, f"{lw}x{lh} pixels, its image {self.pairs[i][0]} {w}x{h}")
        return resize_pair(image, label, self.size, self.dacs_filter, resize_label=not full_label)

    def full_label(self, i):
        return self.load(i)[1] if self.name.startswith("toy-") else read_label(self.pairs[i][1], self.name)


class TrainBatches(torch.utils.data.Dataset):
    """Item `it` is the whole batch of iteration `it`, a pure function of (seed, it) (and of the rank under
    torchrun): loader workers need no shared state, and a resumed run reads exactly the batches it would have read."""

    def __init__(self, cfg, source, target, rcs=None, rank=0, world=1):
        self.cfg, self.source, self.target, self.rcs = cfg, source, target, rcs
        self.stream = [rank] if world > 1 else []  # under torchrun each process draws its own batch
        self.margins = None if cfg.source_only else pseudo_margins(cfg)  # they weight pseudo-labels only
        self.reported = False

    def __len__(self):
        return self.cfg.iters

    def __getitem__(self, iteration):
        """The batch, with the corrupt files skipped on the way and the label warnings; a data error as
        dict(error=message): raised in a loader worker, it would reach the user wrapped in the worker's traceback."""
        rng = np.random.default_rng([self.cfg.seed, iteration, *self.stream])
        skipped = []
        try:
            source = [self.sample(self.source, rng, skipped, is_source=True) for _ in range(self.cfg.batch_size)]
            target = [self.sample(self.target, rng, skipped) for _ in range(self.cfg.batch_size)]
        except DataError as error:
            return dict(error=str(error))
        notes = LABEL_NOTES[:]
        LABEL_NOTES.clear()
        batch = dict(source_image=torch.from_numpy(np.stack([s[0] for s in source])).permute(0, 3, 1, 2),
                     source_label=torch.from_numpy(np.stack([s[1] for s in source])),
                     target_image=torch.from_numpy(np.stack([t[0] for t in target])).permute(0, 3, 1, 2),
                     skipped=skipped, notes=notes)
        if not self.reported:  # this process's reads of the settings, once (the run warns of flags never read)
            batch["flags_read"], self.reported = getattr(self.cfg, "read", ()), True
        if self.margins:  # the margin mask went through crop and flip as a label: 1 inside, 0 margin or padding
            batch["target_valid"] = torch.from_numpy(np.stack([t[1] == 1 for t in target]).astype(np.uint8))
        return batch

    def sample(self, domain, rng, skipped, is_source=False):
        """Pick an image (rare-class sampling on the source when on) and run the pipeline (crop, flip) on it. A
        corrupt file is recorded and replaced by another draw; the training loop decides when that is too many."""
        for _ in range(self.cfg.max_skips + 1):
            rare_class, index = (rcs_pick(rng, *self.rcs) if is_source and self.rcs
                                 else (None, int(rng.integers(len(domain)))))
            try:
                # target labels are never used: not read
                image, label = domain.load(index) if is_source else domain.load(index, with_label=False)
            except CorruptFile as error:
                skipped.append(str(error))
                continue
            if not is_source and self.margins:
                label = margin_mask(image.shape[:2], self.margins)
            sample = self.pipeline(image, label, rng, is_source)
            if rare_class is not None:  # DAFormer re-runs the pipeline up to 10 more times, keeping the last
                for _ in range(10):
                    if crop_has_enough(sample[1], rare_class, self.cfg.rcs_min_pixels * self.cfg.rcs_min_crop_ratio):
                        break
                    sample = self.pipeline(image, label, rng, is_source)
            return sample
        raise DataError(f"{len(skipped)} corrupt files in a row (more than --max-skips {self.cfg.max_skips}), "
                        f"last: {skipped[-1]}")

    def pipeline(self, image, label, rng, is_source):
        """Random crop, then flip. mmseg's RandomCrop checks up to 10 crops for no class covering cat_max_ratio
        or more, drawing a new one after each failure and keeping the last unchecked (source only here: target
        labels are never read)."""
        if self.cfg.crop:
            size = (self.cfg.crop, self.cfg.crop)
            image_crop, label_crop = random_crop(image, label, size, rng)
            if is_source and self.cfg.cat_max_ratio < 1:
                for _ in range(10):
                    counts = np.bincount(label_crop[label_crop != 255], minlength=256)
                    if counts.max(initial=0) < self.cfg.cat_max_ratio * counts.sum():
                        break
                    image_crop, label_crop = random_crop(image, label, size, rng)
            image, label = image_crop, label_crop
        if self.cfg.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        return np.ascontiguousarray(image), np.ascontiguousarray(label)


def pseudo_margins(cfg):
    """--pseudo-margins as (top, bottom, left, right), or None when all are 0."""
    margins = tuple(int(m) for m in cfg.pseudo_margins.split(","))
    return margins if any(margins) else None


def margin_mask(size, margins):
    """HRDA's crop_pseudo_margins (lhoyer/HRDA mmseg/datasets/cityscapes.py): 1, with 0 on the margins of an
    image of `size` (h, w); made on the whole image before crop and flip, which it follows as a label does."""
    (top, bottom, left, right), mask = margins, np.ones(size, np.uint8)
    mask[:top], mask[size[0] - bottom:], mask[:, :left], mask[:, size[1] - right:] = 0, 0, 0, 0
    return mask


def make_loader(cfg, dataset, start_iteration):
    # Its own generator: creating the loader must not draw from the global RNG, or a resumed run
    # (which creates it at another point of the RNG stream) would diverge from a straight one.
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start_iteration, cfg.iters), num_workers=cfg.workers,
        pin_memory=cfg.device.startswith("cuda"), persistent_workers=cfg.workers > 0,
        worker_init_fn=ignore_stop_signals, prefetch_factor=4 if cfg.workers else None,
        generator=torch.Generator().manual_seed(cfg.seed))


def ignore_stop_signals(worker_id):
    """Loader workers leave SIGINT and SIGTERM (sent to the whole process group by Ctrl-C or a cluster) to the
    main process, which finishes the iteration and checkpoints."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register  # after multiprocessing's exit handler, so it runs first
def kill_loader_workers():
    """At exit, loader workers still alive (an error left their loader open) are killed: they ignore SIGTERM,
    with which multiprocessing's exit handler stops them, so it would wait for them forever. Loader workers are
    daemonic; a caller's own non-daemonic processes are left to multiprocessing, which waits for them."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report their end as an error
    for process in multiprocessing.active_children():
        if process.daemon:
            process.kill()
            process.join()


def rcs_statistics(cfg, source, say=print):
    """Per-class pixel counts of every source label, computed once and cached beside the data as
    rcs_stats_<dataset>_<count>.json, keyed by the label files' sizes and modification times: a changed label or a
    corrupt cache is counted anew. A file of that name that is not such a cache is left alone, as is a folder that
    cannot be written (then the counts are not kept). Returns (class probabilities, images per class)."""
    path = os.path.join(cfg.data_root, source.name, f"rcs_stats_{source.name}_{len(source)}.json")
    stats = [os.stat(label) for _, label in getattr(source, "pairs", [])]  # toy scenes: no files, no folder
    key = zlib.crc32(json.dumps([(s.st_size, s.st_mtime_ns) for s in stats]).encode())
    try:
        with open(path) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        cached = None
    ours = isinstance(cached, dict) and cached.keys() == {"key", "counts"}
    counts = cached["counts"] if ours and cached["key"] == key and len(cached["counts"]) == len(source) else None
    if counts is None:
        say(f"rare class sampling: counting classes in {len(source)} source labels...", flush=True)
        counts = [np.bincount(source.full_label(i).ravel(), minlength=256)[:cfg.num_classes].tolist()
                  for i in range(len(source))]
        LABEL_NOTES.clear()  # the loader reports them, once per file
        if os.path.isdir(os.path.dirname(path)) and (ours or not os.path.lexists(path)):
            with contextlib.suppress(DataError):  # a read-only data folder: counted again next time
                atomic_write(path, lambda f: f.write(json.dumps(dict(key=key, counts=counts)).encode()))
    counts = np.array(counts)
    images_per_class = [np.flatnonzero(counts[:, c] > cfg.rcs_min_pixels).tolist() for c in range(cfg.num_classes)]
    if not any(images_per_class):
        raise DataError(f"rare class sampling: no {source.name} image has more than --rcs-min-pixels "
                        f"{cfg.rcs_min_pixels} pixels of any class")
    return rcs_class_probabilities(counts.sum(axis=0), cfg.rcs_temperature), images_per_class


def list_pngs(folder, pattern, skip, naming):
    """Map pairing key -> path for every .png under folder (listing only, nothing is decoded)."""
    if not os.path.isdir(folder):
        raise DataError(f'{folder}: folder not found, expected files named {naming}')
    found, seen = {}, set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):  # data folders are often symlinks
        folder_stat = os.stat(dirpath)
        if (folder_stat.st_dev, folder_stat.st_ino) in seen:  # a symlink loop: each folder is listed once
            dirnames.clear()
            continue
        seen.add((folder_stat.st_dev, folder_stat.st_ino))
        for name in filenames:
            if not name.endswith('.png'):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder).replace(os.sep, '/')
            match = re.fullmatch(pattern, rel)
            if match:
                check_regular_file(path)
                found[match.group(1)] = path
            elif not (skip and re.fullmatch(skip, rel)):
                raise DataError(f'{path}: unexpected file name, expected {naming} in {folder}')
    return found


_SPECIAL_FILES = {stat.S_IFIFO: 'a FIFO', stat.S_IFSOCK: 'a socket', stat.S_IFCHR: 'a device',
                  stat.S_IFBLK: 'a device'}


def check_regular_file(path):
    """Refuse what reading would block on (a FIFO) or fail at later, mid-run (a socket, a device, a dangling
    or looping symlink); symlinks to regular files are fine."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        what = 'a symlink whose target is missing or loops' if os.path.islink(path) else 'cannot be read'
        raise DataError(f'{path}: {what} ({error.strerror}), expected a PNG file') from None
    if not stat.S_ISREG(mode):
        kind = _SPECIAL_FILES.get(stat.S_IFMT(mode), 'a special file')
        raise DataError(f'{path}: not a regular file ({kind}), expected a PNG file')


def find_pairs(dataset, root, split):
    """Sorted (image, label) paths of dataset under root (the folder holding gta/, synthia/, cityscapes/).
    gta and synthia have only a 'train' split holding all files; cityscapes has 'train' and 'val'."""
    if dataset not in LAYOUT:
        raise ValueError(f'unknown dataset {dataset!r}, expected one of {sorted(LAYOUT)}')
    if split not in (('train', 'val') if dataset == 'cityscapes' else ('train',)):
        raise ValueError(f'{dataset} has no split {split!r}')
    layout = LAYOUT[dataset]
    image_naming, label_naming = layout['naming']
    image_dir = os.path.join(root, layout['images'].format(split=split))
    label_dir = os.path.join(root, layout['labels'].format(split=split))
    images = list_pngs(image_dir, layout['image_re'], None, image_naming)
    if not images:
        raise DataError(f'{image_dir}: no images found, expected files named {image_naming}')
    labels = list_pngs(label_dir, layout['label_re'], layout['skip_re'], label_naming)
    for have, want, folder, what in ((images, labels, label_dir, 'labels for images'),
                                     (labels, images, image_dir, 'images for labels')):
        missing = sorted(set(have) - set(want))
        if missing:
            raise DataError(f'{folder}: missing {len(missing)} {what}, first: {have[missing[0]]}')
    return [(images[key], labels[key]) for key in sorted(images)]


# reading
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _pil_array(source, path, mode=None):
    """Decode an image with PIL; any failure on a damaged file becomes CorruptFile naming path."""
    try:
        with Image.open(source) as im:
            return np.array(im.convert(mode) if mode else im)
    except Exception as e:  # PIL raises many different exception types on damaged files
        raise CorruptFile(path, e) from e


def _png(width, height, depth, color_type, scanlines, level=6):
    """Bytes of a non-interlaced PNG from its filtered scanlines (each row starts with its filter byte)."""
    def chunk(tag, body):
        return struct.pack('>I', len(body)) + tag + body + struct.pack('>I', zlib.crc32(body, zlib.crc32(tag)))
    header = struct.pack('>IIBBBBB', width, height, depth, color_type, 0, 0, 0)
    return (_PNG_SIGNATURE + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(scanlines, level))
            + chunk(b'IEND', b''))


def _first_channel(path):
    """First channel of a label PNG at full depth: torchvision decodes 16-bit PNGs (SYNTHIA's labels) as
    uint16, where PIL keeps only the high byte of 16-bit colour."""
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its image IO in favour of torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_png(read_file(path))[0].numpy()
    except Exception as e:  # a RuntimeError from libpng, or an OSError
        raise CorruptFile(path, e) from e


def read_image(path):
    """HxWx3 uint8 RGB. PNGs are decoded by torchvision (the same pixels as PIL, faster), others by PIL."""
    if not path.lower().endswith('.png'):
        return _pil_array(path, path, 'RGB')
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its image IO in favour of torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_png(read_file(path), mode=ImageReadMode.RGB)
    except Exception as e:  # a RuntimeError from libpng, or an OSError
        raise CorruptFile(path, e) from e
    return image.permute(1, 2, 0).numpy() if image.dtype == torch.uint8 else _pil_array(path, path, 'RGB')


# What a label file must be, per dataset: PNG colour types (0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA), bit
# depths and the raw ids it may hold (Cityscapes labelIds 0-33, and 255 where cityscapesscripts wrote id -1).
LABEL_FORMATS = {'gta': dict(color_types=(0, 3), depths=(8,), ids=(*range(34), 255)),
                 'cityscapes': dict(color_types=(0, 3), depths=(8,), ids=(*range(34), 255)),
                 'synthia': dict(color_types=(0, 2, 4, 6), depths=(8, 16), ids=tuple(range(23)))}


class BadLabel(CorruptFile):
    """A label file that decodes but is not what its dataset writes; skipped in training like a corrupt file."""

    def __init__(self, path, dataset, reason):
        self.path = path
        DataError.__init__(self, f'{path}: not a {dataset} label file ({reason})')


def check_label_header(path, dataset):
    """The PNG signature and IHDR (bit depth, colour type) of a label, read without decoding it."""
    try:
        with open(path, 'rb') as f:
            head = f.read(26)
    except OSError as e:
        raise CorruptFile(path, e) from e
    if head[:8] != _PNG_SIGNATURE or head[12:16] != b'IHDR':
        kind = 'a JPEG' if head[:3] == b'\xff\xd8\xff' else 'not a PNG'
        raise BadLabel(path, dataset, f'{kind}: its first bytes are {head[:8]!r}')
    depth, color_type = head[24], head[25]
    format_ = LABEL_FORMATS[dataset]
    if depth not in format_['depths'] or color_type not in format_['color_types']:
        raise BadLabel(path, dataset, f'PNG of bit depth {depth} and colour type {color_type}; expected depth '
                                      f"{' or '.join(map(str, format_['depths']))}, colour type "
                                      f"{' or '.join(map(str, format_['color_types']))}")


LABEL_NOTES = []  # read_label's reports of unknown ids in this process, taken by whoever shows them


def check_label_ids(ids, path, dataset):
    """Raw ids outside the dataset's table: a label made mostly of them is refused (BadLabel); a few are read as
    ignore (255), as the id tables map them, and reported in LABEL_NOTES."""
    counts = np.bincount(ids.ravel())
    present = np.flatnonzero(counts)
    unknown = np.setdiff1d(present, LABEL_FORMATS[dataset]['ids'])
    if not unknown.size:
        return
    share = counts[unknown].sum() / ids.size
    reason = (f"ids {unknown[:8].tolist()}{' ...' if unknown.size > 8 else ''} are not {dataset} label ids, on "
              f"{share:.1%} of its pixels" + (" (channels in another order?)" if dataset == 'synthia' else ''))
    if share > 0.5:
        raise BadLabel(path, dataset, reason)
    LABEL_NOTES.append(f'{path}: {reason}; read as ignore (255)')


def read_label(path, dataset):
    """HxW uint8 train ids (255 = ignore), mapped from the dataset's raw label ids, after checking that the file
    is a label of that dataset (check_label_header, check_label_ids)."""
    check_label_header(path, dataset)
    if dataset == 'synthia':
        ids = _first_channel(path)
        check_label_ids(ids, path, dataset)
        return SYNTHIA_ID_TO_TRAIN[ids]
    ids = _pil_array(path, path)
    if ids.ndim != 2 or ids.dtype != np.uint8:
        raise BadLabel(path, dataset, f'expected an 8-bit single-channel PNG of Cityscapes label ids, got shape '
                                      f'{ids.shape} of {ids.dtype}')
    check_label_ids(ids, path, dataset)
    return CITYSCAPES_ID_TO_TRAIN[ids]


# geometry
def mmseg_rescale_size(width, height, size_wh):
    """mmcv.imrescale's size: the largest scale that fits the long side into max(size_wh) and the short side
    into min(size_wh), each side rounded."""
    scale = min(max(size_wh) / max(width, height), min(size_wh) / min(width, height))
    return int(width * scale + 0.5), int(height * scale + 0.5)


def resize_pair(image, label, size_wh, dacs_filter=None, resize_label=True):
    """Resize an image and its label (nearest) for training or evaluation; the label takes the image's new size,
    which also removes GTA's few image/label size mismatches. dacs_filter (a PIL filter): DACS, exactly size_wh
    with PIL (antialiased when shrinking). None: mmseg, keeping the aspect ratio, bilinear without antialiasing
    as OpenCV, with torchvision. resize_label=False keeps the full-size label (mmseg evaluation)."""
    if dacs_filter is not None:
        image = np.array(Image.fromarray(image).resize(size_wh, dacs_filter))
        if resize_label:
            label = np.array(Image.fromarray(label).resize(size_wh, Image.Resampling.NEAREST))
        return image, label
    width, height = mmseg_rescale_size(image.shape[1], image.shape[0], size_wh)
    image = TF.resize(torch.from_numpy(image).permute(2, 0, 1), [height, width],
                      TF.InterpolationMode.BILINEAR, antialias=False).permute(1, 2, 0).numpy()
    if resize_label:
        label = TF.resize(torch.from_numpy(label)[None], [height, width], TF.InterpolationMode.NEAREST)[0].numpy()
    return image, label


def random_crop(image, label, crop, rng):
    """A random crop (h, w) of an aligned pair; a smaller pair is first padded bottom/right (image 0,
    label 255) so the crop always has the requested size."""
    if image.shape[:2] != label.shape:
        raise ValueError(f'image {image.shape[:2]} and label {label.shape} differ in size')
    (h, w), (height, width) = crop, label.shape
    pad_h, pad_w = max(h - height, 0), max(w - width, 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=255)
    y = rng.integers(0, label.shape[0] - h + 1)
    x = rng.integers(0, label.shape[1] - w + 1)
    return image[y:y + h, x:x + w], label[y:y + h, x:x + w]


def write_fake_dataset(root, dataset, n, size_wh, seed=0):
    """Write n random image/label pairs of dataset under root in the real layout and naming (cityscapes: n
    per split, alternating between two cities). Labels hold raw ids (incl. ids mapped to 255) in 8x8 blocks;
    SYNTHIA labels are 16-bit RGB with instance ids > 255 in channel 1. Images are the palette colour of each
    pixel's class plus noise, so a model can learn something. As in real GTA, the last GTA label (n > 1) is
    2 px wider than its image."""
    rng = np.random.default_rng(seed)
    width, height = size_wh
    if dataset == 'cityscapes':
        names = []
        for split, cities in (('train', ('aachen', 'bochum')), ('val', ('frankfurt', 'lindau'))):
            for i in range(n):
                stem = f'{cities[i % 2]}/{cities[i % 2]}_{i:06d}_000019'
                names.append((split, stem + '_leftImg8bit.png', stem + '_gtFine_labelIds.png'))
    elif dataset == 'gta':  # real GTA names start at 00001
        names = [('train', f'{i:05d}.png', f'{i:05d}.png') for i in range(1, n + 1)]
    else:  # real SYNTHIA names start at 0000000
        names = [('train', f'{i:07d}.png', f'{i:07d}.png') for i in range(n)]
    num_ids, table = (23, SYNTHIA_ID_TO_TRAIN) if dataset == 'synthia' else (34, CITYSCAPES_ID_TO_TRAIN)
    for k, (split, image_name, label_name) in enumerate(names):
        image_path = os.path.join(root, LAYOUT[dataset]['images'].format(split=split), image_name)
        label_path = os.path.join(root, LAYOUT[dataset]['labels'].format(split=split), label_name)
        os.makedirs(os.path.dirname(image_path), exist_ok=True)
        os.makedirs(os.path.dirname(label_path), exist_ok=True)
        label_width = width + 2 if dataset == 'gta' and n > 1 and k == n - 1 else width
        blocks = rng.integers(0, num_ids, size=(-(-height // 8), -(-label_width // 8)))
        ids = blocks.repeat(8, axis=0).repeat(8, axis=1)[:height, :label_width]
        train_ids = table[ids[:, :width]]
        colours = np.where(train_ids[..., None] < len(PALETTE), PALETTE[np.minimum(train_ids, len(PALETTE) - 1)], 0)
        image = colours + rng.integers(-20, 21, size=(height, width, 3))
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(image_path)
        if dataset != 'synthia':
            Image.fromarray(ids.astype(np.uint8)).save(label_path)
            continue
        channels = np.stack([ids, rng.integers(256, 4000, size=ids.shape), np.zeros_like(ids)], axis=-1)
        scanlines = channels.astype('>u2').view(np.uint8).reshape(height, -1)
        with open(label_path, 'wb') as f:  # PIL cannot write 16-bit RGB; each row gets filter byte 0 (none)
            f.write(_png(label_width, height, 16, 2, np.pad(scanlines, ((0, 0), (1, 0))).tobytes()))


def check_data(cfg):
    """List and pair every split the task reads and print the counts; with --decode also decode and validate
    every pair (check_pair) in --workers processes, with a progress line, and list every problem."""
    domains = [Domain(name, cfg.data_root, split, cfg.seed) for name, split in
               ((cfg.source, "train"), (cfg.target, "train"), (cfg.target, "val"))]
    for domain, split in zip(domains, ("train", "train", "val")):
        print(f"{domain.name} {split}: {len(domain)} image/label pairs", flush=True)
    if not cfg.decode:
        return
    items = [(domain, i) for domain in domains if hasattr(domain, "pairs") for i in range(len(domain))]
    problems, notes, start = [], [], time.perf_counter()
    results = torch.utils.data.DataLoader(PairCheck(items), batch_size=None, num_workers=cfg.workers)
    for done, (problem, note) in enumerate(results, start=1):
        problems += [problem] if problem else []
        notes += note
        if done % max(1, len(items) // 10) == 0 or done == len(items):
            seconds = (time.perf_counter() - start) / done
            print(f"  decoded {done}/{len(items)} pairs, {len(problems)} problems, ETA "
                  f"{format_eta(seconds * (len(items) - done))}", flush=True)
    for line in problems + [f"warning: {note}" for note in notes]:
        print(line, flush=True)
    if problems:
        raise DataError(f"{len(problems)} of {len(items)} image/label pairs are unreadable or not labels of "
                        f"their dataset (listed above)")


class PairCheck(torch.utils.data.Dataset):
    """Item i: (problem or "", label warnings) of decoding the i-th (domain, index) pair as training does."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        domain, index = self.items[i]
        LABEL_NOTES.clear()
        try:
            domain.load(index, full_label=True)
            problem = ""
        except DataError as error:
            problem = str(error)
        return problem, LABEL_NOTES[:]
