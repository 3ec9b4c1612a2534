"""The machinery around the algorithm. A reader of MRM needs none of it: mrm.py is the method and
train_dacs_mrm.py the training algorithm; this package holds what a run needs besides.

    base.py      the errors both scripts report as one line; atomic writes; ETA text
    cli.py       train_dacs_mrm.py's flags (help, defaults, choices, ranges), parse_config, the settings that
                 remember which flags a run read
    augment.py   colour jitter and blur: kornia 0.5.8's, as DACS/DAFormer/MIC call them, in plain torch
    models.py    DeepLabV2 / DeepLabV3+ on dilated ResNets, MiT with the DAFormer head, pretrained weights
    hrda.py      HRDA's multi-resolution model (context and detail views, scale attention, slide inference)
    networks.py  a run's networks (student, EMA teacher, Rebuilder, ImageNet copy), optimizers, schedule, DDP
    data.py      label tables, tasks, dataset layouts, decoding and checking PNGs, training batches, RCS
    toy.py       the toy task's street scenes in a source and a target style
    runs.py      checkpoints, export, the work dir's rules and lock, signals, torchrun's process group
    speed.py     the step as one CUDA graph, --bench, --bench-data, --estimate-memory, --count-flops
    reports.py   debug grids of one iteration, the class legend of every picture of predictions, seed
                 summaries and loss curves of runs
    predict.py   predictions of image files for eval.py: read as viewed, at a bounded size; benchmark files

Imports run one way: train_dacs_mrm.py -> eval.py -> support -> mrm.py.
"""
