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
import os
import signal
import sys
import time

from support.base import stop_quietly_until_main

if __name__ == "__main__":  # torch takes seconds to load: a signal meanwhile is one line too
    stop_quietly_until_main()

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from support.base import ConfigError, CorruptFile, DataError, format_eta, one_line
from support.cli import DEFAULT_WORKERS, OneLineParser, check_device
from support.data import CLASSES, Domain, LABEL_NOTES, TASKS, ignore_stop_signals
from support.models import ARCHS, load_tensors
from support.networks import build_model
from support.predict import (CITYSCAPES_SPLIT_SIZES, cityscapes_images, cityscapes_writer, image_writer,
                             input_transform, list_images, predict_files, present_classes, write_png)
from support.reports import is_curves_png, plot_curves, summarise_runs, with_legend
from support.runs import export_model, inference_record, load_checkpoint, load_model_state


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


# ----------------------------------------------------------------------------- safety of what is written

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


def is_export(path):
    """Whether path holds an inference-only model file (--export's or a run's export), not a training checkpoint."""
    try:
        state = load_tensors(path)
    except ValueError:
        return False
    return isinstance(state, dict) and {"arch", "model"} <= state.keys() and "optimizers" not in state


# ----------------------------------------------------------------------------- command line

def build_parser():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    if args.workers < 0 or not 0 <= args.seed < 2 ** 63:
        raise DataError(f"--workers {args.workers}, --seed {args.seed}: the workers must be 0 or more, the seed in "
                        f"[0, 2^63)")


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
    """SIGTERM or SIGHUP (a closed terminal), raised where the program is, as Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def on_stop_signal(signum, frame):
    raise Terminated(signum)


def main(argv=None):
    args = build_parser().parse_args(argv)
    previous = {s: signal.signal(s, on_stop_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        check_flags(args)
        if args.summary:
            summarise_runs(args.summary, args.per_class)
        elif args.plot:
            if not args.out.lower().endswith(".png"):
                raise DataError(f"--out {args.out}: --plot draws a PNG; name it NAME.png")
            check_output_file(args.out, "--out", args.data_root, args.overwrite, replaces=is_curves_png)
            for run in args.plot:
                if not os.path.isfile(os.path.join(run, "log.jsonl")):
                    raise DataError(f"{run}: no log.jsonl, expected the work dir of a training run")
            drawn = plot_curves(args.plot, args.out)
            print(f"wrote {args.out}: {len(drawn)} series of {len(args.plot)} run(s)")
        else:
            run_model(args)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the file system refused (a full disk, a folder that cannot be written)
        print(f"error: {f'{error.filename}: ' if error.filename else ''}{error.strerror or one_line(error)}",
              file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as stop:
        signum = stop.signum if isinstance(stop, Terminated) else signal.SIGINT
        print(f"{'interrupted' if signum == signal.SIGINT else 'terminated'}: stopped at once; nothing is left "
              f"half-written, the files written so far are complete", file=sys.stderr)
        return 128 + signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
