"""eval.py --images: pictures read as a viewer shows them, tiny, huge and extreme-aspect images, what is listed."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as E
from eval import main as eval_main
import support.predict as P
from support.data import DATASETS
from support.networks import build_model
from support.reports import with_legend
from support.runs import export_model
from support.toy import TOY_CLASSES, TOY_PALETTE

CPU = ["--device", "cpu", "--workers", "0"]


def toy_export(path, arch="dlv2-tiny", seed=0):
    """A random toy model (7 classes, size None: images used as drawn), exported as training exports it."""
    torch.manual_seed(seed)
    model, arch_record = build_model(arch, 7)
    arch_record["align_corners"] = False
    export_model(str(path), model, arch_record, 7, task="toy")
    return str(path), model.eval()


@torch.no_grad()
def logits_by_hand(model, model_input, size):
    x = torch.from_numpy(np.ascontiguousarray(model_input)).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(model(x), size=size, mode="bilinear", align_corners=False)[0]


def predict(tmp_path, model_path, images, *flags):
    out = tmp_path / "out"
    assert eval_main([model_path, "--images", str(images), "--out", str(out), *flags] + CPU) == 0
    return out


def test_pictures_are_read_as_viewed_and_converted_by_value(tmp_path):
    ramp = (np.arange(6 * 8, dtype=np.uint32).reshape(6, 8) * 1393).astype(np.uint16)  # 0 .. 65471
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    deep = P.read_viewed_image(str(tmp_path / "deep.png"))
    assert deep.dtype == np.uint8 and deep.shape == (6, 8, 3)
    assert np.array_equal(deep, np.repeat((ramp >> 8).astype(np.uint8)[..., None], 3, axis=-1))  # not 255 from 256 up

    rng = np.random.default_rng(0)
    viewed = rng.integers(0, 256, (5, 9, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned left: a viewer turns it right
    Image.fromarray(np.rot90(viewed).copy()).save(tmp_path / "turned.png", exif=exif)
    assert np.array_equal(P.read_viewed_image(str(tmp_path / "turned.png")), viewed)

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 100, 0, 255)
    rgba[0, 1] = (200, 100, 0, 0)  # transparent: white, as shown over a page
    rgba[1] = (0, 0, 0, 128)
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    assert P.read_viewed_image(str(tmp_path / "alpha.png")).tolist() == \
        [[[200, 100, 0], [255, 255, 255]], [[127, 127, 127], [127, 127, 127]]]
    Image.fromarray(np.array([[True, False]])).save(tmp_path / "bits.png")
    assert P.read_viewed_image(str(tmp_path / "bits.png")).tolist() == [[[255] * 3, [0] * 3]]
    indexed = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    indexed.putpalette([10, 20, 30, 40, 50, 60])
    indexed.save(tmp_path / "indexed.png")
    assert P.read_viewed_image(str(tmp_path / "indexed.png")).tolist() == [[[10, 20, 30], [40, 50, 60]]]


def test_images_predicts_the_viewed_picture_of_a_turned_or_16_bit_file(tmp_path):
    rng = np.random.default_rng(1)
    viewed = rng.integers(0, 256, (20, 36, 3), dtype=np.uint8)
    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned right: a viewer turns it left
    Image.fromarray(np.rot90(viewed, -1).copy()).save(images / "turned.png", exif=exif)
    grey = (viewed[..., 0].astype(np.uint16) << 8) | 0xAB  # its low byte is below what 8 bits show
    Image.fromarray(grey).save(images / "deep.png")
    toy, model = toy_export(tmp_path / "toy.pth")
    out = predict(tmp_path, toy, images)
    for name, picture in (("turned", viewed), ("deep", np.repeat(viewed[..., :1], 3, axis=-1))):
        ids = np.array(Image.open(out / f"{name}_trainid.png"))
        assert np.array_equal(ids, logits_by_hand(model, picture, (20, 36)).argmax(0).numpy()), name
        colour = np.array(Image.open(out / f"{name}_color.png"))
        assert np.array_equal(colour, with_legend(TOY_PALETTE[ids], TOY_CLASSES, TOY_PALETTE, np.unique(ids)))


def test_tiny_and_extreme_aspect_images_get_predictions_of_their_own_size(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(2)
    sizes = {"dot": (1, 1), "tiny": (3, 2), "tall": (1, 300), "wide": (300, 1)}  # (width, height)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{name}.png")
    mit, _ = toy_export(tmp_path / "mit.pth", arch="mit-tiny")  # its strides need 32 pixels a side
    monkeypatch.setitem(DATASETS["cityscapes"], "size", (96, 48))  # a model that resizes: 1x300 fits as 0x96
    torch.manual_seed(0)
    model, arch_record = build_model("dlv2-tiny", 19)
    arch_record["align_corners"] = True
    export_model(str(tmp_path / "city.pth"), model, arch_record, 19, task="gta2cs")
    for model_path in (mit, str(tmp_path / "city.pth")):
        out = predict(tmp_path, model_path, images, "--overwrite")
        for name, (w, h) in sizes.items():
            ids = np.array(Image.open(out / f"{name}_trainid.png"))
            assert ids.shape == (h, w), (model_path, name)
            colour = np.array(Image.open(out / f"{name}_color.png"))
            assert colour.shape[1] == max(w, 160) and colour.shape[0] > h  # the legend below, at least 160 wide


def test_a_big_image_is_predicted_at_a_bounded_size_without_its_full_size_logits(tmp_path, monkeypatch):
    """Stand-ins for a 6000x4000 photo and a toy model: 120x80 pixels, at most 48 a side into the model, and logits
    of at most 16 columns of the full height at once."""
    monkeypatch.setattr(P, "MAX_SIDE", 48)
    monkeypatch.setattr(P, "LOGITS_BUDGET", 7 * 80 * 16)
    images = tmp_path / "images"
    images.mkdir()
    image = np.random.default_rng(3).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    Image.fromarray(image).save(images / "big.png")
    toy, model = toy_export(tmp_path / "toy.pth")
    inputs, resized = [], []
    build = E.model_from_state

    def spied_model(*args, **kwargs):
        built = build(*args, **kwargs)
        built[0].register_forward_pre_hook(lambda module, x: inputs.append(tuple(x[0].shape[-2:])))
        return built

    interpolate = F.interpolate

    def spied_interpolate(*args, **kwargs):
        resized.append(interpolate(*args, **kwargs))
        return resized[-1]

    monkeypatch.setattr(E, "model_from_state", spied_model)
    monkeypatch.setattr(F, "interpolate", spied_interpolate)
    out = predict(tmp_path, toy, images)
    monkeypatch.setattr(F, "interpolate", interpolate)
    assert inputs == [(32, 48)]  # 120x80 fit into 48
    assert max(x.numel() for x in resized) < 7 * 80 * 120  # never the (C, H, W) logits
    ids = np.array(Image.open(out / "big_trainid.png"))
    assert ids.shape == (80, 120)
    logits = logits_by_hand(model, P.model_input(image, None, None, 1), (80, 120))
    top2 = logits.topk(2, dim=0).values
    clear = (top2[0] - top2[1] > 1e-4).numpy()  # banded sums may differ in their last bit
    assert clear.mean() > 0.99 and np.array_equal(ids[clear], logits.argmax(0).numpy()[clear])
    assert len(np.unique(ids)) > 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_listing_skips_fifos_and_never_goes_round_a_linked_folder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for path in (folder / "a.png", folder / "sub" / "b.jpg"):
        Image.new("RGB", (4, 4)).save(path)
    os.mkfifo(folder / "pipe.png")  # opening it would wait for a writer
    os.symlink("..", folder / "sub" / "up")  # a loop: photos/sub/up/sub/up/...
    os.symlink("a.png", folder / "c.png")  # a link to a file is a file
    assert P.list_images(str(folder)) == [str(folder / "a.png"), str(folder / "c.png")]
    assert P.list_images(str(folder / "**" / "*.*")) == [str(folder / "a.png"), str(folder / "c.png"),
                                                         str(folder / "sub" / "b.jpg")]
    assert P.list_images(str(folder / "**")) == P.list_images(str(folder / "**" / "*.*"))  # ** last: every file
    assert P.list_images(str(folder / "sub" / "*.jpg")) == [str(folder / "sub" / "b.jpg")]
