"""Converted models pickle: ``torch.save(model)`` + ``torch.load(weights_only=False)`` in the same process and in a
fresh one (which has not converted anything, so the classes convert() makes at run time, ``FusedStem<Name>`` and
``FusedTimm<Name>``, do not exist there yet), and ``copy.deepcopy`` (EMA wrappers), for torchvision- and
timm-shaped models, real torchvision / timm where they import, and fusedres's own builders (static classes).

Judged by: the loaded model's classes are the fused ones (the same class objects in the same process), its
state_dict equals the original's key by key and value by value, its ``fusedres.summary`` is the same (stem and
blocks still fused), and its eval output equals the original's (bitwise where the kernels' configs are the
same; within the fp32 tolerance in a fresh process, which may autotune differently on a GPU)."""
import copy
import functools
import io
import os
import subprocess
import sys
import textwrap
import warnings
import zlib

import pytest
import torch
from test_timm import build
from timm_like import timm_like
from torchvision_like import torchvision_resnet

import fusedres
from fusedres import _pickle
from helpers import TOL, randomize_bn, real_library

TESTS = os.path.dirname(os.path.abspath(__file__))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# name: (builder, group); each exercises another made class or path: torchvision's stem with basic blocks,
# timm's deep-tiered stem + resnet-D bottlenecks, timm's SE blocks (split path), fusedres's own net converted
# (static classes: fused=False -> fused=True); the real libraries' models skip where those do not import.
MODELS = {
    "torchvision_like": (lambda: torchvision_resnet(False), "look-alike"),
    "timm_like-resnet26t": (lambda: timm_like("resnet26t"), "look-alike"),
    "timm_like-seresnet50": (lambda: timm_like("seresnet50"), "look-alike"),
    "fusedres-cifar_resnet8": (lambda: fusedres.cifar_resnet(8, "B", fused=False), "look-alike"),
    "torchvision-resnet18": (lambda: real_library("torchvision").models.resnet18(num_classes=10), "real"),
    "timm-seresnet18": (lambda: build("seresnet18", "timm", narrow=True), "real"),  # skips without timm
    "timm-resnet26d": (lambda: build("resnet26d", "timm", narrow=True), "real"),
}


def _summary(model):
    with open(os.devnull, "w") as null:
        return fusedres.summary(model, file=null)


@functools.lru_cache(maxsize=None)
def _converted(name):
    """(converted eval model with random BN statistics, a random input, its eval output, its summary): made
    once per model for this file's tests (TF32 off for the forward, as conftest's fixture sets it)."""
    torch.manual_seed(zlib.crc32(name.encode()))
    model = randomize_bn(MODELS[name][0]()).to(DEVICE).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm_like-seresnet50: its attention convs stay eager, said in a warning
        fusedres.convert(model)
    summary = _summary(model)
    assert " eager " not in summary and "stem fused" in summary, summary
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    return model, x, out, summary


def assert_same_model(loaded, model, x=None, out=None, summary=None):
    """Same class objects, same state_dict (keys and values), same summary, eval output bitwise equal."""
    assert type(loaded) is type(model), f"{type(loaded)} is not {type(model)}"
    assert [(n, type(m)) for n, m in loaded.named_modules()] == [(n, type(m)) for n, m in model.named_modules()]
    state, want = loaded.state_dict(), model.state_dict()
    assert list(state) == list(want)
    for key in want:
        assert torch.equal(state[key], want[key]), key
    assert loaded.training == model.training
    if summary is not None:
        assert _summary(loaded) == summary
    if x is not None:
        with torch.no_grad():
            got = loaded(x)
        assert torch.equal(got, out), f"max |diff| {(got - out).abs().max().item():.3e}"


def _round_trip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_save_load_same_process(name):
    model, x, out, summary = _converted(name)
    loaded = _round_trip(model)
    assert loaded is not model
    assert_same_model(loaded, model, x, out, summary)


@pytest.mark.parametrize("name", list(MODELS))
def test_deepcopy(name):
    model, x, out, summary = _converted(name)
    twin = copy.deepcopy(model)
    assert_same_model(twin, model, x, out, summary)
    with torch.no_grad():  # a copy, not a view: changing it leaves the original alone
        next(twin.parameters()).add_(1.0)
    assert not torch.equal(next(twin.parameters()), next(model.parameters()))


_CHILD = textwrap.dedent("""
    import copy, os, sys
    import torch
    import fusedres
    from fusedres import _pickle
    from fusedres.reference import rel_err
    assert not _pickle._CLASSES, "nothing converted yet in this process"
    for data in torch.load(sys.argv[1]):
        model = torch.load(data["file"], weights_only=False)
        twin = copy.deepcopy(model)
        for m in (model, twin):
            cls = type(m)
            assert (cls.__module__, cls.__name__) == data["class"], cls
            if "_fusedres_spec" in vars(cls):  # a made class: remade here, and cached for convert()
                assert _pickle._CLASSES[cls.__bases__] is cls is type(model)
            assert [(n, type(b).__name__) for n, b in m.named_modules()] == data["classes"]
            with open(os.devnull, "w") as null:
                assert fusedres.summary(m, file=null) == data["summary"]
            state = m.state_dict()
            assert list(state) == list(data["state"])
            assert all(torch.equal(state[k], v) for k, v in data["state"].items())
        with torch.no_grad():
            got = model(data["x"])
        err = rel_err(got, data["out"])
        assert err <= data["tol"], f"{data['name']}: relative error {err:.3e}"
        print("loaded", data["name"], type(model).__name__)
""")


@pytest.mark.parametrize("group", ["look-alike", pytest.param("real", marks=pytest.mark.slow)])
def test_torch_load_in_fresh_process(group, tmp_path):
    """The files load in a process that imported fusedres but converted nothing (no made class exists there
    yet): same classes by name, state_dict, summary, and eval output within the fp32 tolerance (a GPU may
    autotune other tiles there). One process per group: starting one costs seconds."""
    if group == "real":
        real_library("torchvision")
        real_library("timm")
    names = [n for n, (_, g) in MODELS.items() if g == group]
    items = []
    for name in names:
        model, x, out, summary = _converted(name)
        torch.save(model, tmp_path / f"{name}.pt")
        items.append({"name": name, "file": str(tmp_path / f"{name}.pt"), "x": x, "out": out, "summary": summary,
                      "state": model.state_dict(), "tol": TOL[torch.float32],
                      "class": (type(model).__module__, type(model).__name__),
                      "classes": [(n, type(m).__name__) for n, m in model.named_modules()]})
    torch.save(items, tmp_path / "data.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
               FUSEDRES_STRICT="1")
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "data.pt")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split("\n")[:-1] == [f"loaded {n} {type(_converted(n)[0]).__name__}" for n in names], \
        proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["resnet50", "wide_resnet50_2"])
def test_fusedres_builders_pickle(name):
    """fusedres's builders (static classes, stem fused by the model itself): save / load and deepcopy keep the
    classes and the state_dict (not run: full width is slow in the interpreter; the static classes are the
    ones converted nets use above)."""
    model = getattr(fusedres, name)(num_classes=10).eval()
    assert model.fused and type(model.layer1[0]) is fusedres.FusedBottleneck
    assert_same_model(_round_trip(model), model, summary=_summary(model))
    assert_same_model(copy.deepcopy(model), model)


class _Subclass:
    """Set by the test below: a user's subclass of a made class (module-level name: pickled by reference)."""


def test_made_classes_are_cached_and_subclasses_pickle_as_usual():
    """One made class per (mixin, base) for the process; a user's subclass of one is pickled as usual."""
    global _Subclass
    a, b = torchvision_resnet(False), torchvision_resnet(True)
    fusedres.convert(a)
    fusedres.convert(b)
    assert type(a) is type(b) is _pickle._CLASSES[type(a).__bases__]
    _Subclass = type("_Subclass", (type(a),), {"__module__": __name__})
    a.__class__ = _Subclass
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    assert type(torch.load(buf, weights_only=False)) is _Subclass
    assert type(copy.deepcopy(a)) is _Subclass


@pytest.mark.parametrize("name", ["resnet18d"])
def test_deepcopy_after_training_step_like_ema(name, device):
    """EMA: deepcopy a fused model in training (drop_path active, gradients set), then use the copy in eval."""
    torch.manual_seed(zlib.crc32(name.encode()))
    model = randomize_bn(timm_like(name, drop_path_rate=0.1)).to(device).train()
    fusedres.convert(model)
    model(torch.randn(2, 3, 32, 32, device=device)).square().mean().backward()
    ema = copy.deepcopy(model)
    assert type(ema) is type(model) and ema.training
    assert_same_model(ema, model)  # parameters and the running statistics of the step
    model.eval()
    ema.eval()
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        assert torch.equal(ema(x), model(x))
