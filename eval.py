"""Evaluate a trained segmentation model on the target validation set, as the paper does.

    python eval.py runs/gta2cs-dlv2-dacs-mrm-seed0/model.pth --task gta2cs --data-root data
    python eval.py CHECKPOINT --task syn2cs --save-dir predictions      # also write colour PNGs
    python eval.py runs/.../checkpoint.pth --export model.pth           # inference-only weights

Whole-image inference at the training input size (Cityscapes: 1024x512), logits resized bilinearly
(with the align_corners the model was trained with, recorded in the checkpoint) to the full-resolution
label (2048x1024) before the argmax: the mmseg protocol of DAFormer, MIC and MRM (images resized as
OpenCV does, without antialiasing). `--protocol dacs` resizes the images with PIL and the labels to
1024x512 instead, as DACS's own code does. The mIoU
sums intersections and unions over all images (one confusion matrix), ignoring label 255. Only the
segmentation model is loaded: a checkpoint's Rebuilder, teacher and optimiser are never read into it.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

from train_dacs_mrm import (TASKS, DataError, Domain, build_model, evaluate, export_model, load_checkpoint,
                            load_model_state, miou_report)


def load_segmentation_model(path, device="cpu"):
    """(model, number of classes, architecture info) from a training checkpoint or an export."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state or "arch" not in state:
        raise DataError(f"{path}: not a checkpoint of train_dacs_mrm.py (no 'model' and 'arch' entries)")
    info = state["arch"]
    needed = {"arch", "align_corners"} | ({"layers", "width", "style", "aspp_dilations", "decoder"}
                                          if isinstance(info, dict) and info.get("arch", "").startswith("dlv2") else set())
    if not isinstance(info, dict) or needed - info.keys():
        raise DataError(f"{path}: written by an older train_dacs_mrm.py (its architecture record lacks "
                        f"{sorted(needed - set(info or ()))}); retrain, or add them to state['arch']")
    num_classes = state["num_classes"] if "num_classes" in state else state["config"]["num_classes"]
    model, _ = build_model(info["arch"], num_classes, info=info)
    load_model_state(model, state["model"], path)
    return model.to(device).eval(), num_classes, info


def prediction_writer(save_dir, domain, palette):
    """Writes <name>.png: the input image beside its colour prediction."""
    def write(i, image, prediction):
        name = (os.path.splitext(os.path.basename(domain.pairs[i][0]))[0] if hasattr(domain, "pairs")
                else f"{domain.name}_{i:05d}")
        colour = palette[prediction]
        if colour.shape[:2] != image.shape[:2]:  # mmseg protocol: full-resolution prediction
            colour = np.asarray(Image.fromarray(colour).resize(image.shape[1::-1], Image.NEAREST))
        Image.fromarray(np.concatenate([image, colour], axis=1)).save(os.path.join(save_dir, name + ".png"))

    return write


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint.pth or model.pth written by train_dacs_mrm.py")
    parser.add_argument("--task", choices=sorted(TASKS), default="gta2cs")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--protocol", choices=["mmseg", "dacs"], default="mmseg")
    parser.add_argument("--save-dir", default="", help="write input|prediction PNGs here")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --save-dir")
    parser.add_argument("--export", default="", help="write an inference-only state dict here and exit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="toy task: the seed of its scenes")
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    try:
        model, num_classes, info = load_segmentation_model(args.checkpoint, args.device)
        if args.export:
            export_model(args.export, model, info, num_classes)
            print(f"wrote {args.export}: {info['arch']}, {num_classes} classes, no Rebuilder")
            return 0
        if num_classes != len(task["class_names"]):
            raise DataError(f"{args.checkpoint}: model predicts {num_classes} classes, "
                            f"task {args.task} has {len(task['class_names'])}")
        val = Domain(task["target"], args.data_root, "val", args.seed, framework=args.protocol)
        writer = None
        if args.save_dir:
            if os.path.isdir(args.save_dir) and os.listdir(args.save_dir) and not args.overwrite:
                raise DataError(f"{args.save_dir}: not empty; pass --overwrite to write into it")
            os.makedirs(args.save_dir, exist_ok=True)
            writer = prediction_writer(args.save_dir, val, task["palette"])
        start = time.perf_counter()
        conf = evaluate(model, val, num_classes, torch.device(args.device), info["align_corners"], args.amp,
                        args.protocol, writer, args.workers)
        seconds = time.perf_counter() - start
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table, _ = miou_report(conf, task["eval_classes"], task["class_names"])
    print(f"{args.checkpoint} on {len(val)} {task['target']} val images ({args.protocol} protocol), "
          f"{seconds:.1f} s on {args.device} ({1000 * seconds / len(val):.1f} ms/image, loading included):\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
