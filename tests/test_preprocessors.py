"""The ControlNet preprocessors that need no network, each against the WebUI ControlNet
extension's formula (its scripts/preprocessor/model_free_preprocessors.py,
legacy/processor.py, annotator/util.py, annotator/color and annotator/shuffle, and the
removed annotator/binary) restated here with OpenCV and NumPy, on small random images: equal
to the last bit (the extension is deterministic; shuffle from its NumPy seed)."""

import numpy as np
import pytest

import sdjax
from sdjax.controlnet import preprocess

cv2 = pytest.importorskip("cv2")


def _image(seed: int = 0, size=(37, 53)) -> np.ndarray:
    """Random pixels over a white page with dark strokes: every preprocessor finds something
    (edges, lines, pixels on both sides of its threshold)."""
    rng = np.random.RandomState(seed)
    img = np.full((*size, 3), 235, np.uint8)
    img[5:9, :] = 20
    img[:, 30:33] = 40
    img[15:30, 5:20] = rng.randint(0, 256, (15, 15, 3))
    return (img.astype(np.int16) + rng.randint(-12, 13, img.shape)).clip(0, 255).astype(
        np.uint8)


# The extension's code, restated.
def hwc3(x):
    return np.concatenate([x[:, :, None]] * 3, axis=2) if x.ndim == 2 else x


def resize_image_with_pad(img, resolution):
    h_raw, w_raw, _ = img.shape
    k = float(resolution) / float(min(h_raw, w_raw))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    h_t, w_t = int(np.round(float(h_raw) * k)), int(np.round(float(w_raw) * k))
    img = cv2.resize(img, (w_t, h_t), interpolation=interpolation)

    def pad64(x):
        return int(np.ceil(float(x) / 64.0) * 64 - x)

    padded = np.pad(img, [[0, pad64(h_t)], [0, pad64(w_t)], [0, 0]], mode="edge")
    return padded, lambda x: x[:h_t, :w_t]


def ext_tile_resample(img, res, thr_a):
    if thr_a < 1.1:
        return img
    h, w = int(float(img.shape[0]) / float(thr_a)), int(float(img.shape[1]) / float(thr_a))
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def ext_blur_gaussian(img, res, thr_a):
    img, remove_pad = resize_image_with_pad(img, res)
    return cv2.GaussianBlur(remove_pad(img), (0, 0), float(thr_a))


def ext_threshold(img, res, thr_a):
    img, remove_pad = resize_image_with_pad(img, res)
    result = np.zeros_like(img, dtype=np.uint8)
    result[np.min(img, axis=2) > thr_a] = 255
    return remove_pad(result)


def ext_color(img, res, thr_a):
    h, w = img.shape[:2]
    if h < w:
        size = (int(round(w / h * res)), res)
    else:
        size = (res, int(round(h / w * res)))
    img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    small = cv2.resize(img, (w // 64, h // 64), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def ext_lineart_standard(img, res, thr_a):
    img, remove_pad = resize_image_with_pad(img, res)
    x = img.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > 8]))
    intensity *= 127
    return hwc3(remove_pad(intensity.clip(0, 255).astype(np.uint8)))


def ext_scribble_xdog(img, res, thr_a):
    img, remove_pad = resize_image_with_pad(img, res)
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros_like(img, dtype=np.uint8)
    result[2 * (255 - dog) > thr_a] = 255
    return remove_pad(result)


def ext_binary(img, res, thr_a):
    h, w = float(img.shape[0]), float(img.shape[1])
    k = float(res) / min(h, w)
    hh, ww = int(np.round(h * k / 64.0)) * 64, int(np.round(w * k / 64.0)) * 64
    img = cv2.resize(img, (ww, hh),
                     interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    if thr_a == 0 or thr_a == 255:
        _, out = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    else:
        _, out = cv2.threshold(gray, thr_a, 255, cv2.THRESH_BINARY_INV)
    return cv2.cvtColor(out, cv2.COLOR_GRAY2RGB)


def ext_shuffle(img, res, seed):
    np.random.seed(seed)  # the extension's set_numpy_seed, then the global stream

    def make_noise_disk(h, w, c, f):
        noise = np.random.uniform(low=0, high=1, size=((h // f) + 2, (w // f) + 2, c))
        noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)
        noise = noise[f: f + h, f: f + w]
        noise -= np.min(noise)
        noise /= np.max(noise)
        return noise[:, :, None] if c == 1 else noise

    img, remove_pad = resize_image_with_pad(img, res)
    img = remove_pad(img)
    h, w, _ = img.shape
    x = make_noise_disk(h, w, 1, 256) * float(w - 1)
    y = make_noise_disk(h, w, 1, 256) * float(h - 1)
    flow = np.concatenate([x, y], axis=2).astype(np.float32)
    return cv2.remap(img, flow, None, cv2.INTER_LINEAR)


CASES = [  # name, the extension's function, (processor_res, threshold_a) pairs
    ("tile_resample", ext_tile_resample, [(512, None), (512, 1.05), (512, 2.5), (64, 8.0)]),
    ("blur_gaussian", ext_blur_gaussian, [(48, None), (80, 0.7), (40, 3.0)]),
    ("threshold", ext_threshold, [(48, None), (64, 0), (72, 200)]),
    ("color", ext_color, [(64, None), (130, None)]),
    ("lineart_standard", ext_lineart_standard, [(48, None), (100, None)]),
    ("scribble_xdog", ext_scribble_xdog, [(48, None), (64, 1), (72, 64)]),
    ("binary", ext_binary, [(64, None), (100, 255), (64, 90)]),
]
DEFAULT_A = {"tile_resample": 1.0, "blur_gaussian": 9.0, "threshold": 127,
             "scribble_xdog": 32, "binary": 0, "color": None, "lineart_standard": None}


@pytest.mark.parametrize("name, ext, params", CASES, ids=[c[0] for c in CASES])
def test_preprocessor_is_the_extensions_formula(name, ext, params):
    for seed, (res, a) in enumerate(params):
        img = _image(seed)
        kwargs = {} if a is None else {"threshold_a": a}
        ours = preprocess(name, img, processor_res=res, **kwargs)
        expected = hwc3(ext(img, res, DEFAULT_A[name] if a is None else a))
        assert ours.dtype == np.uint8 and ours.shape == expected.shape, (res, a)
        np.testing.assert_array_equal(ours, expected, err_msg=f"{name} {res} {a}")
        if not (name == "tile_resample" and (a or 1.0) < 1.1):
            assert ours.shape != img.shape or not np.array_equal(ours, img)
        assert len(np.unique(ours)) > 1, (name, res, a)  # not a blank map


def test_shuffle_is_the_extensions_from_its_seed():
    """shuffle is the extension's flow after np.random.seed(seed + subseed): the same seed,
    the same image (and another seed another one); no seed is one line."""
    img = _image(3, (70, 90))
    for seed in (0, 12345, 2**32 - 1):
        ours = preprocess("shuffle", img, processor_res=64, seed=seed)
        np.testing.assert_array_equal(ours, ext_shuffle(img, 64, seed))
    assert not np.array_equal(preprocess("shuffle", img, processor_res=64, seed=1),
                              preprocess("shuffle", img, processor_res=64, seed=2))
    with pytest.raises(ValueError, match="shuffle preprocessor needs a seed"):
        preprocess("shuffle", img)


def test_preprocessor_params_are_checked_in_one_line():
    """The extension's slider ranges and names; canny keeps its low/high_threshold names."""
    img = _image(4)
    np.testing.assert_array_equal(
        preprocess("canny", img, processor_res=48, threshold_a=50, threshold_b=150),
        preprocess("canny", img, processor_res=48, low_threshold=50, high_threshold=150))
    bad = [("tile_resample", dict(threshold_a=64), r"Down Sampling Rate\) must be in \[1, 8\]"),
           ("blur_gaussian", dict(threshold_a=0), r"Sigma\) must be in \[0.01, 64\]"),
           ("threshold", dict(threshold_a=float("nan")), "finite"),
           ("scribble_xdog", dict(threshold_a="x"), "must be a number"),
           ("threshold", dict(threshold_b=3), "takes no threshold_b"),
           ("invert", dict(threshold_a=3), "takes no threshold_a"),
           ("color", dict(processor_res=32), "processor_res >= 64"),
           ("blur_gaussian", dict(processor_res=0), "processor_res must be at least 1"),
           ("tile_resample", dict(threshold_a=8.0, processor_res=64), None),
           ("threshold", dict(low_threshold=3), "canny's threshold_a"),
           ("depth_midas", {}, "unknown preprocessor 'depth_midas'"),
           ("inpaint_only", {}, "unknown preprocessor 'inpaint_only'")]
    small = np.random.RandomState(5).randint(0, 256, (6, 7, 3)).astype(np.uint8)
    for name, kwargs, message in bad:
        if message is None:  # shrinking past one pixel
            with pytest.raises(ValueError, match="leaves no pixel"):
                preprocess(name, small, **kwargs)
            continue
        with pytest.raises((ValueError, TypeError), match=message) as e:
            preprocess(name, img, **kwargs)
        assert "\n" not in str(e.value)
    assert set(sdjax.controlnet.PREPROCESSORS) >= {
        "none", "invert", "canny", "tile_resample", "blur_gaussian", "threshold", "color",
        "lineart_standard", "scribble_xdog", "shuffle", "binary"}


def test_sample_runs_the_preprocessors_as_the_extension(tmp_path):
    """sdjax.sample's --control_preprocessor: at the image's own resolution, the extension's
    default thresholds (in the PNG text too), shuffle's NumPy seed the WebUI's seed + subseed
    (none: the seed again)."""
    from PIL import Image

    from sdjax.controlnet import cli
    from sdjax.controlnet.settings import ControlNets
    from sdjax.sample import build_parser
    img = _image(6, (40, 48))
    Image.fromarray(img).save(tmp_path / "c.png")
    for flags, seed in (([], 14), (["--subseed", "5"], 12)):
        args = build_parser().parse_args([
            "--controlnet", "a", "--controlnet", "b", "--control_image", str(tmp_path / "c.png"),
            "--control_image", str(tmp_path / "c.png"), "--control_preprocessor", "shuffle",
            "--control_preprocessor", "tile_resample", "--seed", "7", *flags])
        made = cli.load_images(args, lambda path, what: Image.open(path))
        np.testing.assert_array_equal(made[0], ext_shuffle(img, 40, seed))
        np.testing.assert_array_equal(made[1], img)  # tile_resample's default rate 1
    units = ControlNets.from_args(args).units
    assert "Module: tile_resample, Model: b, Weight: 1.0, Resize Mode: Just Resize, " \
        "Threshold A: 1, Guidance Start" in units[1].infotext()
