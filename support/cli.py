"""The command line of train_dacs_mrm.py: every flag with its default, help and choices (FLAGS), their allowed
ranges, and parse_config, which resolves a run's settings from the flags, the task, the architecture and the
recipe table that the training script passes in."""
import argparse
import contextlib
import math
import os
import re
import textwrap
from types import SimpleNamespace

import torch

from support.base import ConfigError
from support.data import DATASETS, TASKS
from support.models import ARCHS, DECODERS
from support.toy import TOY_SCENE


# Every key is a flag: --mask-ratio 0.5, and for a switch --mrm / --no-mrm. A value comes from, last wins: the
# default here, the recipe, the task, the command line. An entry whose default is a type (int, float, bool, str) is
# set by every recipe: it has no default of its own. --help prints each flag's help, default and choices.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
DEFAULT_WORKERS = min(4, CORES)


def cpu_threads(cfg):
    """--threads, or torch's default less one thread per loader worker on the cores (a thread per core in all)."""
    return cfg.threads or max(1, min(torch.get_num_threads(), CORES - cfg.workers))


FLAGS = {
    "run and data": dict(
        task=("toy", "what to adapt: GTA5 -> Cityscapes, SYNTHIA -> Cityscapes, or generated toy scenes (CPU)"),
        data_root=("data", "folder holding gta/, synthia/ and cityscapes/ (see README for the layout)"),
        pretrained=("", "ImageNet / MS-COCO weights of the encoder; required for gta2cs and syn2cs, 'none' "
                        "trains from scratch"),
        work_dir=("", "where checkpoint.pth, config.json, log.jsonl and model.pth go "
                      "(default runs/<task>-<arch>-<method>-seed<seed>)"),
        seed=(0, "seed of every random draw: batches, masks, ClassMix, augmentation, initialisation"),
        workers=(DEFAULT_WORKERS, "data loader processes, by default one per core up to 4"),
        log_every=(50, "iterations between progress lines and log.jsonl records (the first is printed at once)"),
        val_every=(5000, "iterations between validations on the target val split (0: only the last iteration's)"),
        checkpoint_every=(1000, "iterations between checkpoints (atomic: a crash keeps the last one)"),
        stop_after=(0, "stop after this many iterations of this run, checkpointed; continue with --resume (0: off)"),
        resume=(False, "continue from the work dir's checkpoint (the same experiment: see the end of --help)"),
        overwrite=(False, "start over in a work dir that holds another run, removing its files"),
        max_skips=(10, "corrupt files a run may skip (each is named) before it stops"),
        debug_every=(1000, "iterations between debug grids of the first image of a batch in work_dir/debug/ (0: off)"),
    ),
    "model": dict(
        arch=("", "encoder (default: the task's); *-tiny are for tests and the toy task"),
        decoder=("", "segmentation head (default: the arch's first): deeplabv2 | deeplabv3plus (ResNets), "
                     "daformer (MiT)"),
        aspp_dilations=("6,12", "DeepLabV2 classifier branches: 6,12 as every UDA baseline ran it, or the "
                                "four of the DeepLabV2 paper", ("6,12", "6,12,18,24")),
    ),
    "recipe and schedule": dict(
        recipe=("", "the official training code to reproduce (default: the arch's; see README 'What the "
                    "recipes do')"),
        iters=(int, "training iterations"),
        batch_size=(2, "source images and target images per iteration (per process under torchrun)"),
        crop=(512, "square training crop (0: whole images)"),
        optimizer=(str, "optimizer of the network", ("sgd", "adamw")),
        lr=(float, "encoder learning rate"),
        head_lr_mult=(float, "decoder learning rate = lr x this"),
        momentum=(0.9, "SGD momentum"),
        weight_decay=(float, "weight decay of the network"),
        norm_no_decay=(bool, "no weight decay on LayerNorm parameters (mmseg's paramwise_cfg)"),
        poly_power=(float, "poly learning-rate decay to 0 at --iters"),
        warmup_iters=(int, "linear warm-up iterations (mmcv's, ratio 1e-6)"),
        dacs_param_slots=("official", "DACS's SGD: update each tensor once per time DACS's parameter list "
                                      "holds it (official) or once (unique)", ("official", "unique")),
    ),
    "DACS": dict(
        source_only=(False, "train on the source only: no target, no teacher, no MRM"),
        ema=(float, "teacher EMA: alpha = min(1 - 1/(iteration+1), this)"),
        pseudo_threshold=(0.968, "pseudo-label weight = share of target pixels at least this confident"),
        jitter=(float, "colour jitter strength (brightness, contrast, saturation, hue) on the mixed images"),
        jitter_p=(0.8, "probability that a batch is jittered"),
        blur_p=(0.5, "probability that a batch is blurred"),
        align_corners=(bool, "align_corners of every logit upsampling, in training and evaluation"),
        flip=(bool, "random horizontal flip of the crops"),
        cat_max_ratio=(float, "re-crop the source up to 10 times while one class covers this share or more (1: off)"),
        rcs_temperature=(float, "rare class sampling of source images, DAFormer's temperature (0: off)"),
        rcs_min_pixels=(3000, "rare class sampling: an image qualifies for a class with more pixels of it"),
        rcs_min_crop_ratio=(0.5, "rare class sampling: re-crop (up to 10 times) until the crop holds more than this "
                                 "x --rcs-min-pixels pixels of the class"),
        fd_weight=(float, "weight of DAFormer's ImageNet feature distance on thing classes (0: off)"),
        pl_crop=(bool, "pseudo-label weight 0 on the top 15 and bottom 120 rows of the crop (DAFormer)"),
        pseudo_margins=("0,0,0,0", "pseudo-label weight 0 on this many top,bottom,left,right rows and columns of "
                                   "the whole target image, carried through crop and flip"),
    ),
    "MRM and the paper's ablations": dict(
        mrm=(True, "the MRM auxiliary task (--no-mrm: the baseline)"),
        mrm_weight=(1.0, "lambda of Eq. 5"),
        mask_ratio=(0.4, "share of the grid's cells masked"),
        rebuilder_dim=(512, "Rebuilder width (Table 2a)"),
        rebuilder_depth=(2, "Rebuilder transformer blocks (Table 2b)"),
        rebuilder_heads=(16, "Rebuilder attention heads"),
        rebuilder_grid=(16, "mask grid side (Table 2d)"),
        rebuilder_lr=(2e-4, "Rebuilder learning rate; it always trains with AdamW"),
        rebuilder_weight_decay=(0.01, "Rebuilder weight decay"),
        mrm_domain=("target", "whose features MRM rebuilds (Table 3)", ("target", "source", "both")),
        mrm_mode=("rebuild", "rebuild the masked cells, only mask them (Table 2c), or mask the mixed image "
                             "itself and run the student again (Table 6, input space)", ("rebuild", "mask-only", "input")),
        mrm_objective=("cls", "what the rebuilt features learn (Table 2e): the decoder's classes (Eq. 4), "
                              "image patches or features", ("cls", "pixel", "feature-teacher", "feature-student")),
        mrm_trains=("both", "what the MRM loss's gradient reaches besides the Rebuilder (Table 4)",
                    ("both", "encoder", "decoder")),
    ),
    "MIC": dict(
        mic=(False, "MIC's masked image consistency on the target batch (Hoyer et al. 2023)"),
        mic_mask_ratio=(0.7, "share of MIC's image blocks masked"),
        mic_block_size=(32, "MIC's block side in pixels"),
        mic_weight=(1.0, "weight of MIC's loss"),
    ),
    "HRDA": dict(
        resolution=(1, "training and evaluation images at this multiple (1 or 2) of DAFormer's sizes (GTA "
                       "1280x720, SYNTHIA 1280x760, Cityscapes 1024x512)"),
        detail_crop=(0, "HRDA's multi-resolution model: the side of its full-resolution detail window in the crop "
                        "(0: a single-scale model)"),
        context_scale=(0.5, "HRDA: the context view is the whole crop resized by this"),
        hr_loss_weight=(0.1, "HRDA: the loss is (1 - this) x CE(fused) + this x CE(detail window)"),
    ),
    "precision and speed": dict(
        device=("", "where to train: cpu, cuda or cuda:N (default: cuda when available)"),
        threads=(0, "CPU threads of the training process (0: torch's default, less one per loader worker on the "
                    "machine's cores; 1 is often fastest on a busy machine)"),
        amp=("off", "autocast precision: off (fp32, the official setting), bf16 (faster) or fp16",
             ("off", "bf16", "fp16")),
        channels_last=(True, "channels-last memory format on CUDA"),
        compile=(False, "torch.compile the encoder and decoder"),
        cuda_graph=(False, "capture the step once as a CUDA graph and replay it (one GPU; opt-in until measured "
                           "on a GPU)"),
        checkpoint_blocks=(False, "recompute the MiT blocks' activations in backward (less memory)"),
        aspp_depthwise=("direct", "how the separable ASPP's dilated depth-wise convs run (the same result)",
                        ("direct", "nchw", "space-to-batch")),
    ),
    "several GPUs (torchrun)": dict(
        sync_bn=(False, "synchronise the student's BatchNorm statistics across processes (GPUs only)"),
    ),
    "modes (each does its work and exits)": dict(
        check_data=(False, "list and pair every split the task reads, print the counts"),
        decode=(False, "with --check-data: also decode and validate every image and label, in --workers processes"),
        print_config=(False, "print the resolved configuration as JSON"),
        count_flops=(False, "count the forward multiply-adds of the model and of MRM's extra decoder pass"),
        bench=(0, "time N training steps on random batches of the paper's sizes"),
        bench_data=(0, "time N batches of the data pipeline on GTA-sized PNGs"),
        estimate_memory=(False, "the peak memory of this run's training step at its real sizes, without a GPU: two "
                                "steps on fake tensors, every tensor's bytes counted while it lives"),
    ),
}


FLAG_KEYS = [key for group in FLAGS.values() for key in group]
FLAG_SET = frozenset(FLAG_KEYS)
DEFAULTS = {key: entry[0] for group in FLAGS.values() for key, entry in group.items() if not isinstance(entry[0], type)}
# Speed switches with no row in the paper and not yet measured on a GPU: they work, --help does not list them.
UNLISTED = ("channels_last", "compile", "aspp_depthwise")

# Settings that may differ on --resume (they do not change what is computed); every other flag must match.
RESUME_MAY_CHANGE = ("data_root", "work_dir", "workers", "log_every", "val_every", "checkpoint_every", "stop_after",
                     "resume", "overwrite", "max_skips", "device", "threads", "compile", "cuda_graph", "channels_last",
                     "checkpoint_blocks", "aspp_depthwise", "debug_every")




# Allowed ranges: (low, high, low is allowed, high is allowed); None: unbounded. Checked for every run.
RANGES = dict(
    seed=(0, 2 ** 63 - 1, True, True), workers=(0, None, True, None), threads=(0, None, True, None),
    log_every=(1, None, True, None), val_every=(0, None, True, None), checkpoint_every=(1, None, True, None),
    stop_after=(0, None, True, None), max_skips=(0, None, True, None), iters=(1, None, True, None),
    batch_size=(1, None, True, None), crop=(0, None, True, None), lr=(0, None, False, None),
    head_lr_mult=(0, None, False, None), momentum=(0, 1, True, False), weight_decay=(0, None, True, None),
    poly_power=(0, None, True, None), warmup_iters=(0, None, True, None), ema=(0, 1, True, False),
    pseudo_threshold=(0, 1, True, True), jitter=(0, 0.5, True, True), jitter_p=(0, 1, True, True),
    blur_p=(0, 1, True, True), cat_max_ratio=(0, 1, False, True), rcs_temperature=(0, None, True, None),
    rcs_min_pixels=(0, None, True, None), fd_weight=(0, None, True, None), mrm_weight=(0, None, True, None),
    mask_ratio=(0, 1, True, True), rebuilder_dim=(4, None, True, None), rebuilder_depth=(1, None, True, None),
    rebuilder_heads=(1, None, True, None), rebuilder_grid=(1, None, True, None), rebuilder_lr=(0, None, False, None),
    rebuilder_weight_decay=(0, None, True, None), mic_mask_ratio=(0, 1, True, False),
    mic_block_size=(1, None, True, None), mic_weight=(0, None, True, None), bench=(0, None, True, None),
    bench_data=(0, None, True, None), debug_every=(0, None, True, None), rcs_min_crop_ratio=(0, None, True, None),
    resolution=(1, 2, True, True), detail_crop=(0, None, True, None), context_scale=(0, 1, False, True),
    hr_loss_weight=(0, 1, True, True),
)


def check_ranges(cfg):
    """Every number in its range (NaN and inf refused), the Rebuilder's shape consistent, the crop one the
    network can take."""
    for key, (low, high, low_ok, high_ok) in RANGES.items():
        value = cfg[key]
        text = (("[" if low_ok else "(") + f"{low}, " + (f"{high}" + ("]" if high_ok else ")") if high is not None
                                                         else "inf)"))
        if not math.isfinite(value) or value < low or (value == low and not low_ok) or \
                (high is not None and (value > high or (value == high and not high_ok))):
            raise ConfigError(f"--{key.replace('_', '-')} {value}: must be in {text}")
    if cfg["rebuilder_dim"] % 4 or cfg["rebuilder_dim"] % cfg["rebuilder_heads"]:
        raise ConfigError(f"--rebuilder-dim {cfg['rebuilder_dim']}: must be a multiple of 4 (the sin-cos position "
                          f"embedding) and of --rebuilder-heads {cfg['rebuilder_heads']}")
    largest = max(max(image_size(cfg, name)) for name in (cfg["source"], cfg["target"]))
    if cfg["crop"] and not 32 <= cfg["crop"] <= largest:
        raise ConfigError(f"--crop {cfg['crop']}: must be 0 (whole images) or from 32 (the encoders' stride) to "
                          f"{largest} (the task's largest training image side)")
    if not cfg["crop"] and cfg["task"] != "toy":
        raise ConfigError(f"--crop 0 (whole images) is for the toy task: {cfg['task']}'s images differ in size")


class Settings(SimpleNamespace):
    """A run's settings, one attribute per flag, that remember which flags the run's code has read: a flag given
    on the command line that the run never reads does nothing in it (unread_flags). A copy (a loader worker's)
    remembers what it reads too, and its `read` goes back with its batches."""
    __slots__ = ("given", "read")

    def __init__(self, given, **values):
        super().__init__(**values)
        self.given, self.read = given, set()

    def __getattribute__(self, name):
        if name in FLAG_SET:
            object.__getattribute__(self, "read").add(name)
        return super().__getattribute__(name)

    def __reduce__(self):  # SimpleNamespace's would drop the slots
        return copied_settings, (vars(self), self.given, self.read)


def copied_settings(values, given, read):
    settings = Settings(given, **values)
    settings.read = set(read)
    return settings


def unread_flags(cfg):
    """The flags given on the command line that the run has not read so far, as '--flag value'."""
    def flag(key, value):
        name = key.replace("_", "-")
        return (f"--{name}" if value else f"--no-{name}") if isinstance(value, bool) else f"--{name} {value}"
    return [flag(key, value) for key, value in cfg.given.items() if key not in cfg.read]


def flag_help(key, default, text, recipes):
    """A flag's help line: its text, its default, and the recipes that set it otherwise (every recipe sets a flag
    whose default is a type)."""
    by_value = {}
    for name, recipe in recipes.items():
        if key in recipe and recipe[key] != default:
            by_value.setdefault(recipe[key], []).append(name)
    shown = "; default: the recipe's" if isinstance(default, type) else "" if default == "" else f"; default {default}"
    recipes = "; ".join(f"{', '.join(names)}: {value}" for value, names in by_value.items())
    return (text + shown + (f" (recipe {recipes})" if recipes else "")).replace("%", "%%")


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one line, `error: ...`, exit 2, as every other refusal (--help names the flags)."""

    def error(self, message):
        self.exit(2, f"error: {' '.join(message.split())} (--help lists the flags)\n")


def build_parser(recipes, description):
    may_change = ", ".join("--" + key.replace("_", "-") for key in RESUME_MAY_CHANGE if key in FLAG_KEYS)
    epilog = (f"--resume continues a run only as the experiment it was: these flags may differ from the checkpoint's "
              f"(they change how, not what, is computed): {may_change}; every other flag must match, or the run "
              f"stops naming each difference. Under torchrun the processes wait at most MRM_RENDEZVOUS_TIMEOUT "
              f"seconds (default 300) for each other to start; a missing one ends the run in one error line.")
    parser = OneLineParser(usage="python train_dacs_mrm.py [--task T] [--arch A] [--pretrained FILE] [...]",
                           description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="\n".join(textwrap.wrap(epilog, 100, break_on_hyphens=False)))
    table_choices = dict(task=TASKS, arch=ARCHS, recipe=recipes, decoder=DECODERS)
    for title, flags in FLAGS.items():
        group = parser.add_argument_group(title)
        for key, (default, text, *choices) in flags.items():
            choices = choices[0] if choices else tuple(table_choices.get(key, ()))
            flag, help_text = "--" + key.replace("_", "-"), flag_help(key, default, text, recipes)
            help_text = argparse.SUPPRESS if key in UNLISTED else help_text
            kind = default if isinstance(default, type) else type(default)
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                   help=help_text)
            else:
                metavar = ("|".join(choices) if choices else dict(pseudo_margins="T,B,L,R", device="DEVICE").get(key)
                           or {int: "N", float: "X"}.get(kind, "PATH"))
                group.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=metavar, help=help_text)
    return parser


def parse_config(recipes, argv=None, description=""):
    """The run's settings from the command line `argv`, the task, the architecture and the `recipes` table."""
    given = vars(build_parser(recipes, description).parse_args(argv))
    if given.get("bench") or given.get("bench_data"):  # the benchmarks measure the paper's setting
        given.setdefault("task", "gta2cs")

    def one_of(key, value, allowed):
        if value not in allowed:
            raise ConfigError(f"--{key.replace('_', '-')} {value}: must be one of {' | '.join(allowed)}")

    one_of("task", given.get("task", DEFAULTS["task"]), TASKS)
    task = TASKS[given.get("task", DEFAULTS["task"])]
    arch = given.get("arch") or recipes.get(given.get("recipe"), {}).get("arch") or task["arch"]
    one_of("arch", arch, ARCHS)
    recipe = given.get("recipe") or task.get("recipe") or ARCHS[arch]["recipe"]
    one_of("recipe", recipe, recipes)
    fitting = [a for a, spec in ARCHS.items() if spec["framework"] == recipes[recipe]["framework"]
               and ("mit" in spec or not recipes[recipe].get("detail_crop"))]  # HRDA's model is a MiT's
    if recipe != "toy" and arch not in fitting:
        raise ConfigError(f"--recipe {recipe} does not run --arch {arch}: it runs {', '.join(fitting)}")
    cfg = {**DEFAULTS, **recipes[recipe], **given, "arch": arch, "recipe": recipe}
    cfg.update({k: v for k, v in task.items() if k not in ("arch", "recipe", "palette")},
               num_classes=len(task["class_names"]))
    cfg["device"] = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg["decoder"] = cfg["decoder"] or ARCHS[arch]["decoders"][0]
    for flags in FLAGS.values():
        for key, (_, _, *choices) in flags.items():
            if choices:
                one_of(key, cfg[key], choices[0])
    one_of("decoder", cfg["decoder"], DECODERS)
    if "dacs_param_slots" in given and not (recipe == "dacs" and cfg["optimizer"] == "sgd"):
        raise ConfigError(f"--dacs-param-slots applies to DACS's SGD only (--recipe dacs), not --recipe {recipe}")
    if "aspp_depthwise" in given and cfg["decoder"] not in ("daformer", "deeplabv3plus"):
        raise ConfigError(f"--aspp-depthwise applies to the separable ASPP of --decoder daformer | deeplabv3plus, "
                          f"not {cfg['decoder']}")
    trains = not (cfg["count_flops"] or cfg["check_data"] or cfg["print_config"])
    if cfg["decoder"] == "deeplabv3plus" and cfg["batch_size"] == 1 and trains:
        raise ConfigError("--batch-size 1: DeepLabV3+'s image-pooling BatchNorm needs two or more images per batch "
                          "(per process under torchrun) to train")
    if cfg["decoder"] not in ARCHS[arch]["decoders"]:
        fitting = [a for a, spec in ARCHS.items() if cfg["decoder"] in spec["decoders"]]
        raise ConfigError(f"--decoder {cfg['decoder']} does not fit --arch {arch}: it needs --arch {' | '.join(fitting)}")
    mrm_flags = [f"--{k.replace('_', '-')} {given[k]}" for k in ("mrm_mode", "mrm_objective", "mrm_trains") if k in given]
    if mrm_flags and (not cfg["mrm"] or cfg["source_only"]):
        raise ConfigError(f"{mrm_flags[0]} needs MRM, which --no-mrm / --source-only switch off")
    if cfg["mrm_mode"] == "input" and (cfg["mrm_domain"] != "target" or cfg["mrm_trains"] != "both"):
        raise ConfigError("--mrm-mode input masks the mixed target images and trains the whole student on them: "
                          "it takes --mrm-domain target and --mrm-trains both")
    if cfg["mrm_objective"] != "cls" and (cfg["mrm_mode"] != "rebuild" or cfg["mrm_trains"] != "both"):
        raise ConfigError(f"--mrm-objective {cfg['mrm_objective']} regresses the Rebuilder's output without the "
                          f"decoder: it needs --mrm-mode rebuild and --mrm-trains both")
    margins = cfg["pseudo_margins"].split(",")
    if len(margins) != 4 or not all(re.fullmatch(r"[0-9]+", m.strip()) for m in margins):
        raise ConfigError(f"--pseudo-margins {cfg['pseudo_margins']}: must be four pixel counts top,bottom,left,right "
                          f"(HRDA: 30,240,30,30)")
    check_hrda(cfg, given)
    check_device(cfg["device"])
    if cfg["sync_bn"] and not cfg["device"].startswith("cuda"):
        raise ConfigError("--sync-bn needs --device cuda (torch's SyncBatchNorm runs on GPUs only)")
    if cfg["mic"] and cfg["source_only"]:
        raise ConfigError("--mic needs target images and pseudo-labels, which --source-only switches off")
    if cfg["iters"] <= 0 or cfg["batch_size"] <= 0:
        raise ConfigError("--iters and --batch-size must be positive")
    check_ranges(cfg)
    if "resolution" in given and cfg["resolution"] != 1 and cfg["target"] not in DATASETS:
        raise ConfigError(f"--resolution {cfg['resolution']}: toy scenes are drawn at one size "
                          f"({TOY_SCENE[1]}x{TOY_SCENE[0]}); it applies to the paper's datasets")
    check_nothing_to_do(cfg)
    if cfg["resume"] and cfg["overwrite"]:
        raise ConfigError("--resume continues the work dir's run and --overwrite removes it: pass one of them")
    if cfg["decode"] and not cfg["check_data"]:
        raise ConfigError("--decode works with --check-data")
    modes = [f"--{key.replace('_', '-')}" for key in FLAGS["modes (each does its work and exits)"]
             if cfg[key] and key != "decode"]
    if len(modes) > 1:
        raise ConfigError(f"{modes[0]} and {modes[1]} are modes that each do their work and exit: give one")
    if cfg["bench"] and cfg["source_only"]:
        raise ConfigError("--bench times the DACS step with its target half; --source-only has none: time it without")
    mode = any(cfg[key] for key in FLAGS["modes (each does its work and exits)"])
    weights = ARCHS[arch]["weights"]
    if not cfg["pretrained"] and weights and cfg["task"] != "toy" and not mode:
        raise ConfigError(f"--arch {arch} starts from pretrained weights: pass --pretrained FILE with {weights}; "
                          f"--pretrained none trains from random weights")
    if not cfg["work_dir"]:
        method = "source-only" if cfg["source_only"] else "dacs-mrm" if cfg["mrm"] else "dacs"
        method = ("" if recipe == (task.get("recipe") or ARCHS[arch]["recipe"]) else f"{recipe}-") + method
        method += "-mic" if cfg["mic"] else ""
        cfg["work_dir"] = os.path.join("runs", f"{cfg['task']}-{arch}-{method}-seed{cfg['seed']}")
    return Settings(given, **cfg)


MIN_VIEW = 32  # pixels: a MiT's first stage (stride 4) must cover its spatial-reduction kernel (8)


def image_size(cfg, dataset):
    """(height, width) of a dataset's images as the run resizes them (toy scenes: as drawn)."""
    if dataset not in DATASETS:
        return TOY_SCENE
    width, height = DATASETS[dataset]["size"]
    return height * cfg["resolution"], width * cfg["resolution"]


def check_nothing_to_do(cfg):
    """Refuse a setting that leaves MRM, MIC or the pseudo-labels with nothing to do at the run's real sizes."""
    if cfg["source_only"]:
        return
    if cfg["mrm"]:
        cells = cfg["rebuilder_grid"] ** 2
        masked = round(cfg["mask_ratio"] * cells)
        if masked in (0, cells):
            grid = cfg["rebuilder_grid"]
            raise ConfigError(f"--mask-ratio {cfg['mask_ratio']} masks {'no' if masked == 0 else 'every'} cell of the "
                              f"{grid}x{grid} grid (--rebuilder-grid): MRM would have "
                              f"{'nothing to rebuild' if masked == 0 else 'nothing to rebuild from'}")
        if cfg["mrm_weight"] == 0:
            raise ConfigError("--mrm-weight 0 computes MRM's loss and discards it: train with --no-mrm instead")
    if cfg["mic"] and cfg["mic_weight"] == 0:
        raise ConfigError("--mic-weight 0 computes MIC's loss and discards it: train without --mic instead")
    height, width = image_size(cfg, cfg["target"])
    crop = cfg["crop"] or height
    if cfg["mic"] and cfg["mic_block_size"] > 2 * crop:
        raise ConfigError(f"--mic-block-size {cfg['mic_block_size']}: larger than twice the {crop}-pixel crop, MIC's "
                          f"mask would have no block")
    if cfg["pl_crop"] and crop <= 135:
        raise ConfigError(f"--pl-crop drops the top 15 and bottom 120 rows of the crop: a {crop}-pixel crop keeps no "
                          f"pseudo-label; use a larger --crop or --no-pl-crop")
    top, bottom, left, right = (int(m) for m in cfg["pseudo_margins"].split(","))
    if top + bottom >= height or left + right >= width:
        raise ConfigError(f"--pseudo-margins {cfg['pseudo_margins']}: cover the whole {width}x{height} target image, "
                          f"no pseudo-label would count")


def check_device(name):
    """The torch.device of --device: cpu, cuda or cuda:N, one this machine has; under torchrun each process takes
    its LOCAL_RANK's GPU. Both scripts check their --device here."""
    device = None
    with contextlib.suppress(RuntimeError):
        device = torch.device(name)
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index is not None):
        raise ConfigError(f"--device {name}: unknown device, expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"--device {name}: under torchrun each process takes the GPU of its LOCAL_RANK: pass "
                          f"--device cuda")
    return device


def check_hrda(cfg, given):
    """HRDA's model needs a MiT, window sides whose strides stay whole cells, and the Rebuilder's class objective."""
    if not cfg["detail_crop"]:
        hrda_only = [key for key in ("context_scale", "hr_loss_weight") if key in given]
        if hrda_only:
            raise ConfigError(f"--{hrda_only[0].replace('_', '-')} is a setting of HRDA's model: it needs "
                              f"--detail-crop (or --recipe hrda)")
        return
    up = 1 / cfg["context_scale"]
    if abs(up - round(up)) > 1e-9:
        raise ConfigError(f"--context-scale {cfg['context_scale']}: must be 1 / an integer (HRDA: 0.5)")
    cell = 8 * round(up)  # half a detail window (its slide stride) in whole cells of the context logits
    if "mit" not in ARCHS[cfg["arch"]]:
        raise ConfigError(f"--detail-crop: HRDA's model runs a MiT (--arch mitb5 | mitb3 | mitb2 | mit-tiny), "
                          f"not --arch {cfg['arch']}")
    if cfg["detail_crop"] % cell or (cfg["crop"] and (cfg["crop"] % cell or cfg["detail_crop"] > cfg["crop"])):
        raise ConfigError(f"--detail-crop {cfg['detail_crop']}, --crop {cfg['crop']}: both must be multiples of "
                          f"{cell} (8 / --context-scale), the detail window at most the crop")
    height = image_size(cfg, cfg["target"])[0]
    context = min(cfg["crop"] or height, height)
    if cfg["detail_crop"] < MIN_VIEW or context * cfg["context_scale"] < MIN_VIEW:
        raise ConfigError(f"--detail-crop {cfg['detail_crop']}, --context-scale {cfg['context_scale']}: the detail "
                          f"window and the context view of a {context}-pixel side (the crop, or the validation "
                          f"images) must be at least {MIN_VIEW} pixels, the smallest input a MiT takes")
    if cfg["mrm"] and cfg["mrm_objective"] != "cls":
        raise ConfigError(f"--mrm-objective {cfg['mrm_objective']}: with HRDA's model MRM trains on its losses "
                          f"(--mrm-objective cls)")
    if cfg["compile"]:
        raise ConfigError("--compile: HRDA's detail window moves at every forward, which torch.compile would "
                          "recompile for; train HRDA without it")
