"""Evaluation and serving prepare frames as training did: `squash` checkpoints store Resize 256 +
CenterCrop 224 (the authors' eval transform; training random-crops the same 256 square), shop images
are squashed when the checkpoint says so, letterbox stays the catalog-photo option, and the built-in
encoder's preprocessing (and so its model version) is unchanged."""

from __future__ import annotations

import argparse

import cv2
import numpy as np

from model.config import EncoderConfig, PreprocessConfig
from model.preprocess import pad_to_square, prepare_frame, train_size
from train.data import ClipDataset, ClipRow, read_image
from train.train import build_parser, encoder_config


def _portrait(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 255, (16, 9, 3), dtype=np.uint8), (270, 480), interpolation=cv2.INTER_NEAREST)


def _args(*extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    build_parser(p)
    return p.parse_args(["--train", "x", "--out", "y", "--backbone", "vit", *extra])


def test_squash_checkpoints_store_resize_256_center_crop_224() -> None:
    pre = encoder_config(_args()).preprocess  # --frame-fit squash is the default
    assert (pre.resize, pre.crop, pre.frame_fit, pre.image_fit) == (256, 224, "squash", "letterbox")
    assert train_size(pre) == 256  # training random-crops 224 out of the same 256 square
    crop = encoder_config(_args("--frame-fit", "crop")).preprocess
    assert (crop.resize, crop.crop) == (224, 224) and train_size(crop) == 256  # unchanged for crop checkpoints
    assert encoder_config(_args("--image-fit", "squash")).preprocess.image_fit == "squash"


def test_eval_frame_is_resize_256_then_center_224() -> None:
    bgr = _portrait()
    pre = PreprocessConfig(256, 224, frame_fit="squash")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    want = cv2.resize(rgb, (256, 256), interpolation=cv2.INTER_AREA)[16:240, 16:240]
    assert np.array_equal(prepare_frame(bgr, pre), want)


def test_shop_images_squashed_or_letterboxed_as_the_checkpoint_says() -> None:
    bgr = _portrait(1)
    squash = PreprocessConfig(256, 224, frame_fit="squash", image_fit="squash")
    assert np.array_equal(prepare_frame(bgr, squash, whole=True), prepare_frame(bgr, squash))  # like a frame
    letterbox = PreprocessConfig(256, 224, frame_fit="squash")
    boxed = cv2.cvtColor(pad_to_square(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)), cv2.COLOR_RGB2BGR)
    assert np.array_equal(prepare_frame(bgr, letterbox, whole=True), prepare_frame(boxed, letterbox))
    assert not np.array_equal(prepare_frame(bgr, letterbox, whole=True), prepare_frame(bgr, squash, whole=True))


def test_evaluation_dataset_uses_the_checkpoint_preprocessing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    frame, image = tmp_path / "f.jpg", tmp_path / "i.png"
    cv2.imwrite(str(frame), _portrait(2))
    cv2.imwrite(str(image), _portrait(3))
    pre = PreprocessConfig(256, 224, frame_fit="squash", image_fit="squash")
    item = ClipDataset([ClipRow((str(frame),), str(image), "s")], pre, 2, train=False)[0]
    assert np.array_equal(item["frames"][0].numpy(), prepare_frame(read_image(str(frame)), pre))
    assert np.array_equal(item["image"].numpy(), prepare_frame(read_image(str(image)), pre, whole=True))


def test_built_in_encoder_preprocessing_and_version_fields_unchanged() -> None:
    cfg = EncoderConfig()
    pre = cfg.preprocess
    assert (pre.resize, pre.crop, pre.frame_fit, pre.image_fit) == (224, 224, "crop", "letterbox")
    assert "image_fit" not in cfg.to_dict()["preprocess"]  # model versions (hashes of this dict) unchanged
