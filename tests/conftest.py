"""Shared fixtures: small generated image folders, the tiny backbone, paths to ../shared."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tests.tiny  # noqa: F401  (registers the 'tiny' backbone)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_WEIGHTS = SHARED / "weights" / "vgg16_features_imagenet.pt"
SHARED_CATSDOGS = SHARED / "data" / "catsdogs"

#: class name -> mean RGB colour of its generated images (far apart: linearly separable features)
COLOURS = {"blue": (40, 60, 200), "green": (40, 190, 60), "red": (210, 40, 40)}


def make_image_folder(root: Path, per_class: int = 12, classes=("blue", "red"), seed: int = 0,
                      size=(48, 40)) -> Path:
    """An ImageFolder of noisy solid-colour JPEGs, one sub-folder per class; returns root."""
    rng = np.random.default_rng(seed)
    for c in classes:
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = size[0] + int(rng.integers(0, 16)), size[1] + int(rng.integers(0, 16))
            arr = np.clip(rng.normal(COLOURS[c], 30, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{c}.{i}.jpg", quality=90)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Two classes x 12 generated JPEGs."""
    return make_image_folder(tmp_path / "data")


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C (SIGINT) raises KeyboardInterrupt in this process, as in a terminal: a test run started in the
    background (nohup, a script's '&') inherits SIGINT ignored, and a test raising it saw nothing happen."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture
def shared_available():
    if not (SHARED_WEIGHTS.is_file() and SHARED_CATSDOGS.is_dir()):
        pytest.skip("../shared (real weights and photos) is not beside the project")


@pytest.fixture(scope="session")
def scratch_project(tmp_path_factory) -> Path:
    """A project folder outside the checkout with ``../shared`` beside it, for the slow tests that run the
    README's and the notebook's code as written (their features/ and runs/ land here, never in the checkout).
    One per session, so the notebook finds the cache the README example made."""
    top = tmp_path_factory.mktemp("scratch")
    (top / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    (top / "project").mkdir()
    return top / "project"


@pytest.fixture
def make_cache(tmp_path):
    """``make_cache(data, **options)``: extract's result for ``data`` with the test defaults (all images,
    the tiny random-weight backbone, decoding in-process, caches under tmp_path/features)."""
    from pipeline.extraction.extract import ExtractConfig, extract

    def make(data, **options) -> dict:
        cfg = {"n": 0, "backbone": "tiny", "weights": "none", "workers": 0, "cache_dir": str(tmp_path / "features"),
               **options}
        return extract(ExtractConfig(data=str(data), **cfg))

    return make


@pytest.fixture
def tiny_cache(make_cache, image_folder) -> Path:
    """A complete float32 feature cache of ``image_folder`` (2 x 12 images) from the tiny backbone."""
    return Path(make_cache(image_folder, dtype="float32").cache)


@pytest.fixture(autouse=True)
def _progress_state_restored():
    """`--quiet` sets a process-wide switch; each test starts and ends with the one it found."""
    from pipeline import progress

    before = progress.is_quiet()
    yield
    progress.set_quiet(before)


@pytest.fixture
def one_thread():
    """Tiny problems: BLAS/torch thread pools only add contention on a shared 2-core machine (10x slower)."""
    import torch
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


@pytest.fixture
def old_decoding(monkeypatch):
    """``with old_decoding():`` extract writes caches as the rule before EXIF rotation did (decode_version 2)."""
    import contextlib

    import pipeline.extraction.extract
    import pipeline.extraction.extract_range

    @contextlib.contextmanager
    def patched():
        with pytest.MonkeyPatch.context() as mp:
            for module in (pipeline.extraction.extract, pipeline.extraction.extract_range):
                mp.setattr(module, "DECODE_VERSION", 2)
            yield

    return patched


@pytest.fixture
def no_torchao(monkeypatch):
    """This environment as one without the optional torchao: not importable, no distribution metadata (where
    ``package_version`` says 'unknown'), whether or not the test machine has it."""
    import importlib.metadata
    import importlib.util
    import sys

    find_spec, version = importlib.util.find_spec, importlib.metadata.version

    def missing(name: str) -> bool:
        return name == "torchao" or name.startswith("torchao.")

    def no_version(name):
        if missing(name):
            raise importlib.metadata.PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if missing(name) else
                        find_spec(name, *a, **k))
    monkeypatch.setattr(importlib.metadata, "version", no_version)
    for name in [m for m in sys.modules if missing(m)] or ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)  # an import of it fails
