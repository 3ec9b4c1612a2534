"""Labels, datasets and their folders, resizing and cropping, toy scenes, rare class sampling, metric helpers."""
import math
import os
import struct
import subprocess
import sys
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import support.data
from eval import confusion_matrix, format_table, iou_per_class
from support.base import CorruptFile, DataError
from support.data import (BadLabel, CITYSCAPES_ID_TO_TRAIN, CLASSES, DATASETS, Domain, LABEL_NOTES, PALETTE, SYNTHIA_13,
                          SYNTHIA_16, SYNTHIA_ID_TO_TRAIN, TrainBatches, crop_has_enough, find_pairs,
                          mmseg_rescale_size, random_crop, rcs_class_probabilities, rcs_pick, rcs_statistics,
                          read_image, read_label, resize_pair, write_fake_dataset)
from support.toy import TOY_CLASSES, TOY_PALETTE, make_toy_scene, toy_layout, toy_render

from helpers import REPO


# ---------------------------------------------------------------- rare class sampling

def test_rcs_probabilities_by_hand():
    p = rcs_class_probabilities([900, 90, 10])
    e = [math.exp((1 - f) / 0.01) for f in (0.9, 0.09, 0.01)]
    assert p.dtype == np.float64
    np.testing.assert_allclose(p, [v / sum(e) for v in e], rtol=1e-12)


def test_rcs_pick_skips_classes_without_images():
    rng = np.random.default_rng(0)
    probs = rcs_class_probabilities([1000, 50, 0, 20])  # class 2 is the most likely but has no image
    images = [[0, 1], [2], [], [3, 4, 5]]
    picks = [rcs_pick(rng, probs, images) for _ in range(500)]
    assert all(c != 2 and i in images[c] for c, i in picks)
    assert {c for c, _ in picks} >= {1, 3}


def test_crop_has_enough():
    crop = np.zeros((64, 64), dtype=np.uint8)
    crop.flat[:1500] = 7
    assert not crop_has_enough(crop, 7)
    crop.flat[1500] = 7
    assert crop_has_enough(crop, 7) and crop_has_enough(torch.from_numpy(crop), 7)


# ---------------------------------------------------------------- labels, data and metric

# official cityscapesscripts labels.py: label id -> train id (255 = ignore); -1 (license plate) is not stored
CITYSCAPES_EXPECTED = {0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255,
                       11: 2, 12: 3, 13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8,
                       22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17,
                       33: 18}
# SYNTHIA RAND_CITYSCAPES README ids -> Cityscapes train ids (terrain 16, truck 18, train 20 absent)
SYNTHIA_EXPECTED = {0: 255, 1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18, 12: 17,
                    13: 255, 14: 255, 15: 6, 16: 255, 17: 12, 18: 255, 19: 15, 20: 255, 21: 3, 22: 255}


def write_png16(path, pixels, color_type):
    """16-bit PNG written by hand, row r using PNG filter type (4 - r) % 5 so all five filters are decoded."""
    height, width, channels = pixels.shape
    raw = pixels.astype('>u2').view(np.uint8).reshape(height, -1).astype(np.int64)
    step = 2 * channels  # bytes per pixel: filters look at the same byte of the previous pixel
    left = np.pad(raw, ((0, 0), (step, 0)))[:, :-step]
    up = np.pad(raw, ((1, 0), (0, 0)))[:-1]
    up_left = np.pad(raw, ((1, 0), (step, 0)))[:-1, :-step]
    p = left + up - up_left
    pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
    predictors = [np.zeros_like(raw), left, up, (left + up) // 2, paeth]
    filters = [(4 - r) % 5 for r in range(height)]
    scanlines = b''.join(bytes([f]) + ((raw[r] - predictors[f][r]) % 256).astype(np.uint8).tobytes()
                         for r, f in enumerate(filters))

    def chunk(tag, body):
        return struct.pack('>I', len(body)) + tag + body + struct.pack('>I', zlib.crc32(tag + body))
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 16, color_type, 0, 0, 0))
                + chunk(b'IDAT', zlib.compress(scanlines)) + chunk(b'IEND', b''))


# -----------------------------------------------------------------------------
# label tables and reading


def test_cityscapes_table_and_gta_cityscapes_labels(tmp_path):
    assert CITYSCAPES_ID_TO_TRAIN.dtype == np.uint8 and CITYSCAPES_ID_TO_TRAIN.shape == (256,)
    assert {i: int(CITYSCAPES_ID_TO_TRAIN[i]) for i in range(34)} == CITYSCAPES_EXPECTED
    assert (CITYSCAPES_ID_TO_TRAIN[34:] == 255).all()
    ids = np.array([list(range(34)) + [34, 255]], dtype=np.uint8)
    expected = np.array([[CITYSCAPES_EXPECTED[i] for i in range(34)] + [255, 255]], dtype=np.uint8)
    Image.fromarray(ids).save(tmp_path / 'grey.png')
    palettized = Image.frombytes('P', (36, 1), ids.tobytes())  # original GTA labels are palette PNGs
    palettized.putpalette(np.arange(256).repeat(3).astype(np.uint8).tobytes())
    palettized.save(tmp_path / 'palette.png')
    for dataset, name in (('cityscapes', 'grey.png'), ('gta', 'palette.png')):
        label = read_label(str(tmp_path / name), dataset)
        assert label.dtype == np.uint8 and (label == expected).all()


def test_synthia_table():
    assert SYNTHIA_ID_TO_TRAIN.dtype == np.uint8 and SYNTHIA_ID_TO_TRAIN.shape == (65536,)
    assert {i: int(SYNTHIA_ID_TO_TRAIN[i]) for i in range(23)} == SYNTHIA_EXPECTED
    assert (SYNTHIA_ID_TO_TRAIN[23:] == 255).all()
    present = sorted(set(SYNTHIA_EXPECTED.values()) - {255})
    assert tuple(present) == SYNTHIA_16 and set(SYNTHIA_13) == set(SYNTHIA_16) - {3, 4, 5}


@pytest.mark.parametrize('color_type,channels', [(2, 3), (6, 4), (4, 2), (0, 1)])
def test_synthia_16bit_label_uses_full_first_channel(tmp_path, color_type, channels):
    rng = np.random.default_rng(0)
    first = rng.integers(0, 23, size=(11, 9))
    first[0, :3] = [3 + 256, 21 + 512, 65535]  # road/wall in the low byte only: must map to 255
    pixels = np.stack([first] + [rng.integers(256, 65536, size=first.shape) for _ in range(channels - 1)], -1)
    if channels > 1:
        pixels[1, :, 1] = 3  # 'road' in channel 1 must not leak into the result
    path = str(tmp_path / '0000000.png')
    write_png16(path, pixels, color_type)
    label = read_label(path, 'synthia')
    assert label.dtype == np.uint8 and label.shape == (11, 9)
    assert (label == np.vectorize(lambda i: SYNTHIA_EXPECTED.get(i, 255))(first)).all()
    assert (label[0, :3] == 255).all()


def test_synthia_8bit_label_via_pil(tmp_path):
    ids = np.array([[3, 21, 16], [1, 0, 22]], dtype=np.uint8)
    Image.fromarray(np.stack([ids, ids + 1, ids + 2], -1)).save(tmp_path / 'rgb.png')
    assert (read_label(str(tmp_path / 'rgb.png'), 'synthia') == [[0, 3, 255], [10, 255, 255]]).all()


@pytest.mark.parametrize('dataset', ['gta', 'synthia'])
def test_corrupt_png_raises_corrupt_file(tmp_path, dataset):
    write_fake_dataset(str(tmp_path), dataset, 1, (64, 48))
    (image, label), = find_pairs(dataset, str(tmp_path), 'train')
    for path in (image, label):
        with open(path, 'rb') as f:
            data = f.read()
        with open(path, 'wb') as f:
            f.write(data[:len(data) // 2])
    for read in (lambda: read_image(image), lambda: read_label(label, dataset)):
        with pytest.raises(CorruptFile) as err:
            read()
        assert isinstance(err.value, DataError) and '\n' not in str(err.value)
    assert label in str(err.value)
    (tmp_path / 'junk.png').write_bytes(b'not a png at all')
    with pytest.raises(CorruptFile, match='junk.png'):
        read_label(str(tmp_path / 'junk.png'), 'synthia')
    with pytest.raises(CorruptFile, match='missing.png'):
        read_image(str(tmp_path / 'missing.png'))


# -----------------------------------------------------------------------------
# folder discovery


def test_find_pairs_on_fake_layouts(tmp_path):
    root = str(tmp_path)
    for dataset in ('gta', 'synthia', 'cityscapes'):
        write_fake_dataset(root, dataset, 4, (32, 16))
    gta = find_pairs('gta', root, 'train')
    assert [os.path.relpath(p, root) for p in gta[0]] == ['gta/images/00001.png', 'gta/labels/00001.png']
    assert len(gta) == 4 and gta == sorted(gta)
    synthia = find_pairs('synthia', root, 'train')
    assert [os.path.relpath(p, root) for p in synthia[-1]] == ['synthia/RGB/0000003.png',
                                                              'synthia/GT/LABELS/0000003.png']
    # siblings that real Cityscapes (or DAFormer's converter) put next to the labels are ignored
    (tmp_path / 'cityscapes/gtFine/train/aachen/aachen_000000_000019_gtFine_color.png').write_bytes(b'')
    (tmp_path / 'cityscapes/gtFine/train/aachen/aachen_000000_000019_gtFine_polygons.json').write_bytes(b'')
    for split, cities in (('train', {'aachen', 'bochum'}), ('val', {'frankfurt', 'lindau'})):
        pairs = find_pairs('cityscapes', root, split)
        assert len(pairs) == 4 and pairs == sorted(pairs)
        assert {os.path.basename(os.path.dirname(image)) for image, _ in pairs} == cities
        for image, label in pairs:
            assert label == image.replace('leftImg8bit', 'gtFine', 1).replace('_leftImg8bit.png',
                                                                              '_gtFine_labelIds.png')
    for dataset, pairs in (('gta', gta), ('synthia', synthia)):
        for image, label in pairs:
            assert read_image(image).shape == (16, 32, 3)
            assert set(np.unique(read_label(label, dataset))) <= set(range(19)) | {255}


@pytest.mark.parametrize('case', ['missing folder', 'empty split', 'image without label', 'label without image',
                                  'bad naming'])
def test_find_pairs_errors(tmp_path, case):
    root = str(tmp_path)
    write_fake_dataset(root, 'gta', 3, (8, 8))
    write_fake_dataset(root, 'cityscapes', 2, (8, 8))
    dataset, split = 'gta', 'train'
    if case == 'missing folder':
        expected = os.path.join(root, 'gta/labels')
        for name in os.listdir(expected):
            os.remove(os.path.join(expected, name))
        os.rmdir(expected)
    elif case == 'empty split':
        dataset, split, expected = 'cityscapes', 'val', os.path.join(root, 'cityscapes/leftImg8bit/val')
        for city in ('frankfurt', 'lindau'):
            for name in os.listdir(os.path.join(expected, city)):
                os.remove(os.path.join(expected, city, name))
    elif case == 'image without label':
        os.remove(os.path.join(root, 'gta/labels/00002.png'))
        expected = os.path.join(root, 'gta/images/00002.png')
    elif case == 'label without image':
        os.remove(os.path.join(root, 'gta/images/00003.png'))
        expected = os.path.join(root, 'gta/labels/00003.png')
    else:
        expected = os.path.join(root, 'gta/images/00004 copy.png')
        open(expected, 'wb').close()
    with pytest.raises(DataError) as err:
        find_pairs(dataset, root, split)
    assert expected in str(err.value) and '\n' not in str(err.value)


# -----------------------------------------------------------------------------
# geometry


@pytest.mark.parametrize('dacs_filter,size', [(Image.Resampling.BICUBIC, (16, 40)), (None, (16, 32))])
def test_resize_pair_fixes_gta_size_mismatch(dacs_filter, size):
    image = np.random.default_rng(0).integers(0, 256, size=(10, 20, 3), dtype=np.uint8)
    label = np.tile(np.array([0, 13, 255], dtype=np.uint8), (10, 7))  # 21 wide: one column more than image
    out_image, out_label = resize_pair(image, label, (40, 16), dacs_filter)  # mmseg: keep 2:1 -> 32x16
    assert out_image.shape == size + (3,) and out_label.shape == size
    assert set(np.unique(out_label)) == {0, 13, 255}  # nearest: no blended ids
    out_image, full_label = resize_pair(image, label, (40, 16), dacs_filter, resize_label=False)
    assert out_image.shape == size + (3,) and full_label is label


def test_random_crop_shape_and_padding():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, size=(6, 10, 3), dtype=np.uint8)
    label = rng.integers(0, 19, size=(6, 10), dtype=np.uint8)
    crop_image, crop_label = random_crop(image, label, (4, 5), rng)
    assert crop_image.shape == (4, 5, 3) and crop_label.shape == (4, 5)
    ys, xs = np.nonzero((np.lib.stride_tricks.sliding_window_view(label, (4, 5)) == crop_label).all((-2, -1)))
    assert any((image[y:y + 4, x:x + 5] == crop_image).all() for y, x in zip(ys, xs))
    padded_image, padded_label = random_crop(image, label, (8, 12), rng)
    assert padded_image.shape == (8, 12, 3) and padded_label.shape == (8, 12)
    assert (padded_image[:6, :10] == image).all() and (padded_label[:6, :10] == label).all()
    assert (padded_image[6:] == 0).all() and (padded_label[6:] == 255).all() and (padded_label[:, 10:] == 255).all()


# -----------------------------------------------------------------------------
# evaluation


def test_confusion_matrix_and_iou_by_hand():
    label = torch.tensor([[0, 0, 0, 1], [1, 255, 255, 0]], dtype=torch.uint8)
    pred = torch.tensor([[0, 0, 1, 1], [0, 2, 1, 0]])  # predictions on ignored pixels do not count
    conf = confusion_matrix(pred, label, 3)
    assert conf.dtype == torch.int64
    assert conf.tolist() == [[3, 1, 0], [1, 1, 0], [0, 0, 0]]
    iou = iou_per_class(conf)
    assert iou.dtype == torch.float64
    assert iou[0] == pytest.approx(3 / 5) and iou[1] == pytest.approx(1 / 3) and torch.isnan(iou[2])
    assert (confusion_matrix(pred.numpy(), label.numpy(), 3) == conf).all()
    assert iou_per_class(confusion_matrix(torch.tensor([2, 0]), torch.tensor([0, 0]), 3))[2] == 0  # pred only
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0]), torch.tensor([3]), 3)


def test_format_table_numbers_in_order():
    ious = np.full(19, np.nan)
    ious[list(SYNTHIA_16)] = np.linspace(0.1, 0.85, 16)
    table = format_table(torch.tensor(ious), SYNTHIA_13)
    header, values = ([cell.strip() for cell in line.split('|')] for line in table.splitlines())
    assert header == [CLASSES[i] for i in SYNTHIA_13] + ['mIoU']
    assert values == [f'{ious[i] * 100:.1f}' for i in SYNTHIA_13] + [f'{np.mean(ious[list(SYNTHIA_13)]) * 100:.1f}']
    assert values[:2] == ['10.0', '15.0']
    header, values = ([cell.strip() for cell in line.split('|')] for line in format_table(ious, range(19))
                      .splitlines())
    assert header[-1] == 'mIoU' and values[9] == 'nan' and values[-1] == f'{np.nanmean(ious) * 100:.1f}'


def test_palette():
    assert PALETTE.dtype == np.uint8 and PALETTE.shape == (19, 3)
    assert PALETTE[0].tolist() == [128, 64, 128] and PALETTE[10].tolist() == [70, 130, 180]
    assert PALETTE[13].tolist() == [0, 0, 142] and PALETTE[18].tolist() == [119, 11, 32]


# ---------------------------------------------------------------- toy scenes

STYLES = ('source', 'target')


def _toy_split(style, n, seed, size=(64, 128)):
    rng = np.random.default_rng(seed)
    images, labels = zip(*(make_toy_scene(rng, style, size) for _ in range(n)))
    return np.stack(images), np.stack(labels)


def test_toy_classes_are_cityscapes_subset():
    assert 5 <= len(TOY_CLASSES) <= 8 and set(TOY_CLASSES) <= set(CLASSES)
    assert TOY_PALETTE.shape == (len(TOY_CLASSES), 3) and TOY_PALETTE.dtype == np.uint8


@pytest.mark.parametrize('style', STYLES)
def test_toy_deterministic_for_seed(style):
    a, b, c = _toy_split(style, 5, seed=3), _toy_split(style, 5, seed=3), _toy_split(style, 5, seed=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize('style', STYLES)
@pytest.mark.parametrize('size', [(64, 128), (32, 48), (97, 201), (128, 256)])
def test_toy_shapes_and_dtypes(style, size):
    img, lab = make_toy_scene(np.random.default_rng(0), style, size)
    assert img.shape == (*size, 3) and img.dtype == np.uint8
    assert lab.shape == size and lab.dtype == np.uint8
    imgs, labs = _toy_split(style, 3, seed=0, size=size)
    assert imgs.shape == (3, *size, 3) and labs.shape == (3, *size)
    assert imgs.dtype == np.uint8 and labs.dtype == np.uint8


def test_toy_default_size():
    img, lab = make_toy_scene(np.random.default_rng(0), 'source')
    assert img.shape == (64, 128, 3) and lab.shape == (64, 128)


def test_toy_unknown_style_rejected():
    with pytest.raises(ValueError):
        make_toy_scene(np.random.default_rng(0), 'night')


@pytest.mark.parametrize('style', STYLES)
def test_toy_every_class_appears_and_labels_in_range(style):
    _, labs = _toy_split(style, 50, seed=0)
    assert labs.max() < len(TOY_CLASSES)
    assert set(np.unique(labs)) == set(range(len(TOY_CLASSES)))


def _toy_class_stats(style, n=30):
    """Per-class mean colour and fine texture (median |horizontal step| inside the class),
    rendering the same layouts in the given style."""
    rng = np.random.default_rng(0)
    means, steps = [[] for _ in TOY_CLASSES], [[] for _ in TOY_CLASSES]
    for k in range(n):
        layout = toy_layout(np.random.default_rng(k), 'source')
        img, lab = toy_render(rng, layout, style)
        assert np.array_equal(lab, layout[-1])  # rendering never changes the geometry
        img = img.astype(float)
        step = np.abs(img[:, 1:] - img[:, :-1]).mean(-1)
        inside = lab[:, 1:] == lab[:, :-1]
        for c in range(len(TOY_CLASSES)):
            means[c].append(img[lab == c])
            steps[c].append(step[inside & (lab[:, 1:] == c)])
    return (np.array([np.concatenate(m).mean(0) for m in means]),
            np.array([np.median(np.concatenate(s)) for s in steps]))


def test_toy_styles_differ_in_colour_statistics_for_same_geometry():
    src_mean, src_texture = _toy_class_stats('source')
    tgt_mean, tgt_texture = _toy_class_stats('target')
    shift = np.linalg.norm(src_mean - tgt_mean, axis=1)
    # Road keeps roughly its grey on purpose; every other class moves its mean colour.
    assert (np.delete(shift, TOY_CLASSES.index('road')) > 20).all()
    # Target is textured and noisy where source is flat.
    assert (tgt_texture > src_texture + 2).all()


# ---------------------------------------------------------------- each framework's resize, rare class sampling

def test_resize_as_each_framework_does():
    """DACS: PIL, exactly 1280x720 (GTA bicubic). mmseg: keep the aspect ratio (1914x1052 -> 1280x704),
    bilinear without antialiasing; labels nearest, to the image's new size."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(1052, 1914, 3), dtype=np.uint8)
    label = rng.integers(0, 19, size=(1052, 1916), dtype=np.uint8)  # GTA: a label 2 px wider than its image
    mmseg_image, mmseg_label = resize_pair(image, label, (1280, 720))
    assert mmseg_image.shape == (704, 1280, 3) and mmseg_label.shape == (704, 1280)
    reference = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(704, 1280),
                              mode="bilinear", align_corners=False, antialias=False)[0].permute(1, 2, 0)
    # torchvision's uint8 path interpolates in fixed point, as OpenCV does: within one grey level
    assert (torch.from_numpy(mmseg_image).float() - reference).abs().max() < 1.01
    rows, cols = (np.arange(704) * 1052 / 704).astype(int), (np.arange(1280) * 1916 / 1280).astype(int)
    assert (mmseg_label == label[rows][:, cols]).all()  # OpenCV's nearest: floor(dst * scale)
    dacs_image, dacs_label = resize_pair(image, label, (1280, 720), DATASETS["gta"]["dacs_filter"])
    expected = np.array(Image.fromarray(image).resize((1280, 720), Image.Resampling.BICUBIC))
    assert dacs_image.shape == (720, 1280, 3) and (dacs_image == expected).all() and dacs_label.shape == (720, 1280)
    assert mmseg_rescale_size(2048, 1024, (1024, 512)) == (1024, 512)
    assert mmseg_rescale_size(1280, 760, (1280, 760)) == (1280, 760)


class CountingDomain:
    """One image whose label is class 1 except a rare class 2 in a 4x4 corner, counting pipeline runs."""
    name = "fake"

    def __init__(self, size=64):
        self.label = np.ones((size, size), np.uint8)
        self.label[:4, :4] = 2
        self.image = np.zeros((size, size, 3), np.uint8)

    def __len__(self):
        return 1

    def load(self, i):
        return self.image, self.label


def test_rare_class_sampling_reruns_the_whole_pipeline_up_to_ten_more_times(monkeypatch):
    """DAFormer's get_rare_class_sample: while the crop holds <= min_pixels / 2 of the class, run the
    pipeline (crop with its own cat_max_ratio checks, flip) again on the same image, at most 10 more times."""
    cfg = SimpleNamespace(seed=0, batch_size=1, crop=16, flip=True, cat_max_ratio=1.0, max_skips=0, rcs_min_pixels=40,
                          rcs_min_crop_ratio=0.5, iters=1, pseudo_margins="0,0,0,0", source_only=False)
    domain = CountingDomain(size=20)
    batches = TrainBatches(cfg, domain, domain, rcs=(np.array([0.0, 0.0, 1.0]), [[], [], [0]]))
    runs = []  # pixels of class 2 in each run's crop
    real = batches.pipeline

    def counted(*args):
        result = real(*args)
        runs.append(int((result[1] == 2).sum()))
        return result

    monkeypatch.setattr(batches, "pipeline", counted)
    rng = np.random.default_rng(0)
    image, label = batches.sample(domain, rng, [], is_source=True)
    assert len(runs) == 11 and label.shape == (16, 16)  # 16 pixels of class 2 at most: never > 20
    cfg.rcs_min_pixels = 10  # > 5 pixels: a crop holding the corner is enough
    lengths = set()
    for _ in range(30):
        runs.clear()
        image, label = batches.sample(domain, rng, [], is_source=True)
        assert all(n <= 5 for n in runs[:-1]) and (runs[-1] > 5 or len(runs) == 11)  # stops at the first hit
        assert (label == 2).sum() == runs[-1]  # the last run is the sample
        lengths.add(len(runs))
    assert len(lengths) > 2
    # mmseg's cat_max_ratio: a one-class crop is never balanced: 10 checks, 11 crops drawn, the last one kept
    cfg.cat_max_ratio, cfg.rcs_min_pixels = 0.75, 0
    crops = []
    real_crop = random_crop
    monkeypatch.setattr(support.data, "random_crop", lambda *a: crops.append(1) or real_crop(*a))
    batches.pipeline(np.zeros((64, 64, 3), np.uint8), np.ones((64, 64), np.uint8), rng, True)
    assert len(crops) == 11
    crops.clear()
    batches.pipeline(np.zeros((64, 64, 3), np.uint8), np.ones((64, 64), np.uint8), rng, False)
    assert len(crops) == 1  # target crops: labels are not read


# ---------------------------------------------------------------- bad labels, the statistics' cache, symlinks, decoding

def test_labels_are_validated_where_they_are_read(tmp_path, fake_data, run_main):
    root = fake_data(cityscapes=(2, (64, 32)), synthia=(1, (64, 32)))
    (_, label), _ = find_pairs("cityscapes", root, "val")
    Image.open(label).save(str(tmp_path / "as.jpg"), "JPEG")
    os.replace(str(tmp_path / "as.jpg"), label)  # a JPEG saved under the label's name
    with pytest.raises(BadLabel, match="a JPEG"):
        read_label(label, "cityscapes")
    Image.fromarray(np.full((16, 32), 7, np.uint8)).save(label)  # half the image's size
    with pytest.raises(BadLabel, match="32x16 pixels, its image .* 64x32"):
        Domain("cityscapes", root, "val").load(0)
    mostly_unknown = np.full((32, 64), 40, np.uint8)
    mostly_unknown[:4] = 7
    Image.fromarray(mostly_unknown).save(label)
    with pytest.raises(BadLabel, match=r"ids \[40\] are not cityscapes label ids, on 87.5% of its pixels"):
        read_label(label, "cityscapes")
    LABEL_NOTES.clear()
    a_few = np.full((32, 64), 7, np.uint8)
    a_few[0, :2] = 40
    Image.fromarray(a_few).save(label)
    assert (read_label(label, "cityscapes")[0, :3] == [255, 255, 0]).all()
    assert LABEL_NOTES == [f"{label}: ids [40] are not cityscapes label ids, on 0.1% of its pixels; read as "
                             f"ignore (255)"]
    (_, synthia), = find_pairs("synthia", root, "train")
    swapped = np.stack([np.full((32, 64), 300), np.full((32, 64), 3), np.zeros((32, 64))], -1)
    write_png16(synthia, swapped, 2)  # the instance channel first
    with pytest.raises(BadLabel, match=r"ids \[300\] .* \(channels in another order\?\)"):
        read_label(synthia, "synthia")
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(label)
    with pytest.raises(BadLabel, match="colour type 2"):
        read_label(label, "cityscapes")
    # --check-data --decode finds every problem, in parallel, and says so in one line
    fake_data(gta=(2, (64, 32)))
    code, out, err = run_main(["--task", "gta2cs", "--data-root", root, "--check-data", "--decode", "--workers", "2"])
    assert code == 2 and "decoded 6/6 pairs, 1 problems" in out and "colour type 2" in out
    assert err == "error: 1 of 6 image/label pairs are unreadable or not labels of their dataset (listed above)\n"


def test_rare_class_statistics_follow_the_labels(tmp_path, fake_data):
    root = fake_data(gta=(3, (64, 48)))
    cfg = SimpleNamespace(data_root=root, work_dir=str(tmp_path / "w"), num_classes=19, rcs_min_pixels=0,
                          rcs_temperature=0.01)
    source = Domain("gta", root)
    said = []

    def say(*args, **kwargs):
        said.append(args)

    first = rcs_statistics(cfg, source, say)
    assert rcs_statistics(cfg, source, say)[1] == first[1] and len(said) == 1  # cached
    (_, label), *_ = source.pairs
    Image.fromarray(np.full((48, 64), 26, np.uint8)).save(label)  # all car now
    os.utime(label, ns=(1, 1))
    probabilities, per_class = rcs_statistics(cfg, source, say)
    assert len(said) == 2 and 0 in per_class[13]  # counted again: image 0 now qualifies for car
    cache = os.path.join(root, "gta", "rcs_stats_gta_3.json")
    open(cache, "w").write("{not json")
    assert rcs_statistics(cfg, source, say)[1] == per_class and len(said) == 3
    assert open(cache).read() == "{not json"  # not a cache this program wrote: counted, and left alone
    assert not os.path.exists(cfg.work_dir)  # never in the work dir, which the run has not taken yet


def test_symlink_loops_do_not_hang_the_listing(fake_data):
    root = fake_data(gta=(2, (64, 48)))
    os.symlink(os.path.join(root, "gta", "images"), os.path.join(root, "gta", "images", "loop"))
    os.symlink(os.path.join(root, "gta"), os.path.join(root, "gta", "labels", "up"))
    with pytest.raises(DataError, match="unexpected file name"):  # loop/00001.png is not a GTA name
        find_pairs("gta", root, "train")


def test_symlinked_images_are_followed_and_dangling_or_looping_ones_refused(tmp_path, fake_data):
    root = fake_data(gta=(3, (64, 48)))
    images = os.path.join(root, "gta", "images")
    elsewhere = str(tmp_path / "elsewhere.png")
    os.replace(os.path.join(images, "00003.png"), elsewhere)
    os.symlink(elsewhere, os.path.join(images, "00003.png"))
    os.makedirs(os.path.join(images, "x"))
    os.makedirs(os.path.join(root, "gta", "z"))
    os.symlink(os.path.join(root, "gta", "z"), os.path.join(images, "x", "y"))  # x/y -> z/w -> x -> ...
    os.symlink(os.path.join(images, "x"), os.path.join(root, "gta", "z", "w"))
    assert find_pairs("gta", root, "train")[2][0] == os.path.join(images, "00003.png")
    os.remove(os.path.join(images, "00002.png"))
    os.symlink(str(tmp_path / "missing.png"), os.path.join(images, "00002.png"))
    with pytest.raises(DataError, match="00002.png: a symlink whose target is missing or loops"):
        find_pairs("gta", root, "train")
    os.remove(os.path.join(images, "00002.png"))
    os.symlink(os.path.join(images, "00002.png"), os.path.join(images, "00002.png"))  # points at itself
    with pytest.raises(DataError, match="00002.png: a symlink whose target is missing or loops"):
        find_pairs("gta", root, "train")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_named_like_an_image_is_refused_when_listing(fake_data):
    root = fake_data(gta=(2, (64, 48)))
    image = os.path.join(root, "gta", "images", "00001.png")
    os.remove(image)
    os.mkfifo(image)
    with pytest.raises(DataError, match="images/00001.png: not a regular file \\(a FIFO\\)"):
        find_pairs("gta", root, "train")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_named_like_a_label_stops_check_data_decode_in_one_line_instead_of_blocking(fake_data):
    root = fake_data(gta=(2, (32, 16)), cityscapes=(1, (32, 16)))
    label = os.path.join(root, "gta", "labels", "00001.png")
    os.remove(label)
    os.mkfifo(label)  # opening it waits for a writer forever
    command = [sys.executable, "train_dacs_mrm.py", "--task", "gta2cs", "--data-root", root, "--check-data",
               "--decode", "--workers", "0"]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == f"error: {label}: not a regular file (a FIFO), expected a " \
                                                      f"PNG file\n", result.stderr


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_read_image_decodes_pngs_as_pil_does(tmp_path, mode):
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, size=(13, 21, 3), dtype=np.uint8))
    picture = picture.quantize(16) if mode == "P" else picture.convert(mode)
    path = str(tmp_path / "image.png")
    picture.save(path)
    image = read_image(path)
    assert image.dtype == np.uint8 and np.array_equal(image, np.array(picture.convert("RGB")))
