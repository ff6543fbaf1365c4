"""The pure train/eval steps: compiled == eager, inputs untouched, no recompiles."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from reference import assert_argmax_agrees, assert_tree_equal, clone_tree

from fashion_func import data, models, nn, optim, preprocess, step, tree
from fashion_func import state as state_lib


def _batch(seed: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g), torch.randint(
        0, 10, (n,), generator=g
    )


def _fresh(model_name: str = "mlp", tx=None):
    model = models.get(model_name)
    tx = tx or optim.adam(1e-3)
    st = state_lib.create(model.init(torch.Generator().manual_seed(0)), tx, seed=3)
    return model, tx, st


def test_the_step_data_and_preprocess_share_one_normalisation():
    assert (data.MEAN, data.STD, data.normalize) == (preprocess.MEAN, preprocess.STD, preprocess.normalize)
    assert step.NormalizeImages is preprocess.NormalizeImages and not hasattr(step, "normalize_images")
    images = _batch(0)[0]
    assert torch.equal(step.FASHION_MNIST(images), data.normalize(images))


def test_input_state_is_unchanged_and_a_new_state_is_returned():
    model, tx, st = _fresh()
    before = clone_tree(st)
    train_step = step.make_train_step(model, tx, compile=False)
    new, metrics = train_step(st, _batch(1))
    assert_tree_equal(st, before)
    assert int(new.step) == 1 and int(st.step) == 0
    assert not torch.equal(new.params["linear1.weight"], st.params["linear1.weight"])
    assert set(metrics) == {"loss_sum", "correct", "count"}
    assert int(metrics["count"]) == 32


@pytest.mark.cross_path
def test_step_equals_a_plain_module_and_torch_optim_step():
    model, tx, st = _fresh("simplenet")
    module = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(9216, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )
    names = dict(zip(["0", "2", "6", "8"], ["conv1", "conv2", "fc1", "fc2"], strict=True))
    module.load_state_dict(
        {
            f"{i}.{k.split('.')[1]}": v
            for i, n in names.items()
            for k, v in st.params.items()
            if k.startswith(n + ".")
        }
    )
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    train_step = step.make_train_step(model, tx, compile=False)
    for i in range(3):
        images, labels = _batch(10 + i)
        st, metrics = train_step(st, (images, labels))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(data.normalize(images)), labels)
        loss.backward()
        opt.step()
        torch.testing.assert_close(metrics["loss_sum"] / 32, loss.detach(), rtol=1e-5, atol=1e-6)
    # fp32 Adam amplifies rounding where gradients are near zero (m / sqrt(v)); 1e-4 is a tenth of one update
    torch.testing.assert_close(st.params["fc1.weight"], module[6].weight.detach(), rtol=0, atol=1e-4)


def _small_cnn_with_dropout(p, x, *, train, key):
    """A conv, a pool and dropout (as alexnet has, smaller): the compiled key stream must agree."""
    h = nn.max_pool(nn.relu(nn.conv2d(x, p["conv.weight"], p["conv.bias"])), 2)  # [B, 8, 13, 13]
    h = nn.dropout(h.flatten(1), 0.3, key=key, train=train)
    return nn.linear(h, p["fc.weight"], p["fc.bias"])


@pytest.mark.cross_path
def test_compiled_equals_eager_over_five_steps():
    # dropout: the key stream must agree too. SGD, not Adam: Adam's m / sqrt(v) turns 1e-6
    # rounding differences in near-zero gradients into whole updates.
    g = torch.Generator().manual_seed(0)
    params = {
        "conv.weight": torch.randn(8, 1, 3, 3, generator=g) * 0.3, "conv.bias": torch.zeros(8),
        "fc.weight": torch.randn(10, 8 * 13 * 13, generator=g) * 0.02, "fc.bias": torch.zeros(10),
    }  # fmt: skip
    tx = optim.sgd(0.01, momentum=0.9)
    st = state_lib.create(params, tx, seed=3)
    model = _small_cnn_with_dropout
    eager = step.make_train_step(model, tx, compile=False)
    compiled = step.make_train_step(model, tx, compile=True)
    a = b = st
    for i in range(5):
        batch = _batch(20 + i, n=16)
        a, ma = eager(a, batch)
        b, mb = compiled(b, batch)
        torch.testing.assert_close(ma["loss_sum"], mb["loss_sum"], rtol=1e-4, atol=1e-5)
        assert abs(int(ma["correct"]) - int(mb["correct"])) <= 1  # logits 1e-5 apart: a near tie may flip one
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=1e-4, atol=1e-5)
    assert int(a.step) == int(b.step) == 5


def test_changing_the_learning_rate_does_not_recompile():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    model, tx, st = _fresh()
    train_step = step.make_train_step(model, tx, compile=False)
    compiled_core = torch.compile(lambda s, b: train_step(s, b), backend=counter)
    batch = _batch(5)
    st, _ = compiled_core(st, batch)
    frames = counter.frame_count
    assert frames >= 1
    for lr in (1e-2, 3e-4, 5e-5):
        st = st.replace(opt_state=optim.set_hyperparam(st.opt_state, "lr", lr))
        st, _ = compiled_core(st, batch)
    assert counter.frame_count == frames
    assert float(optim.get_hyperparam(st.opt_state, "lr")) == pytest.approx(5e-5)


@pytest.mark.cross_path
def test_eval_step_gives_per_example_metrics():
    model, _, st = _fresh()
    images, labels = _batch(7, n=40)
    out = step.make_eval_step(model, compile=False, topk=3)(st.params, (images, labels))
    logits = model.apply(st.params, data.normalize(images))
    torch.testing.assert_close(
        out["loss"], torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    )
    assert_argmax_agrees(out["pred"], logits, 1e-5)  # the step's NHWC logits vs NCHW apply's: ulps apart
    assert torch.equal(out["correct"], out["pred"] == labels)
    top3 = logits.topk(3, -1).indices
    assert torch.equal(out["top3_correct"], (top3 == labels[:, None]).any(-1))
    assert out["loss"].shape == out["correct"].shape == (40,)


@pytest.mark.cross_path
def test_bf16_precision_runs_and_tracks_fp32():
    model, tx, st = _fresh("simplenet")
    fp32 = step.make_train_step(model, tx, compile=False)
    bf16 = step.make_train_step(model, tx, compile=False, precision="bf16")
    batch = _batch(9)
    _, ma = fp32(st, batch)
    b, mb = bf16(st, batch)
    assert b.params["fc1.weight"].dtype == torch.float32  # master weights stay fp32
    torch.testing.assert_close(ma["loss_sum"], mb["loss_sum"], rtol=2e-2, atol=1e-2)
    with pytest.raises(ValueError, match="unknown precision"):
        step.make_train_step(model, tx, precision="fp8")


@pytest.mark.cross_path
def test_channels_last_gives_the_same_step():
    model, tx, st = _fresh("simplenet", optim.sgd(0.05, momentum=0.9))
    plain = step.make_train_step(
        model, tx, compile=False, preprocess=step.NormalizeImages(channels_last=False)
    )
    nhwc = step.make_train_step(model, tx, compile=False, preprocess=step.NormalizeImages(channels_last=True))
    a = b = st
    for i in range(3):
        a, ma = plain(a, _batch(30 + i))
        b, mb = nhwc(b, _batch(30 + i))
        torch.testing.assert_close(ma["loss_sum"], mb["loss_sum"], rtol=1e-5, atol=1e-5)
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=1e-4, atol=1e-6)
    x = preprocess.normalize(_batch(0)[0], channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, preprocess.normalize(_batch(0)[0]))


@pytest.mark.cross_path
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_cuda_compiled_step_matches_eager(precision):
    model, tx, st = _fresh("simplenet", optim.sgd(0.05, momentum=0.9))
    st = tree.map(lambda t: t.cuda(), st)
    eager = step.make_train_step(model, tx, compile=False, precision=precision)
    fast = step.make_train_step(model, tx, compile=True, precision=precision)
    a = b = st
    for i in range(5):
        batch = tuple(t.cuda() for t in _batch(40 + i, n=128))
        a, _ = eager(a, batch)
        b, _ = fast(b, batch)
    tol = {"fp32": 1e-4, "tf32": 5e-3, "bf16": 3e-2}[precision]  # tf32/bf16 round products differently
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=tol, atol=tol)


@pytest.mark.cross_path
def test_compiling_only_the_update_equals_eager():
    model, tx, st = _fresh("simplenet", optim.adam(1e-3, weight_decay=1e-4))
    eager = step.make_train_step(model, tx, compile=False)
    hybrid = step.make_train_step(model, tx, compile="update")
    a = b = st
    for i in range(3):
        a, ma = eager(a, _batch(50 + i))
        b, mb = hybrid(b, _batch(50 + i))
        assert torch.equal(ma["loss_sum"], mb["loss_sum"]) or i > 0  # same forward on the same params
    for k in a.params:  # Adam: a tenth of an lr-sized update covers reassociated elementwise math
        torch.testing.assert_close(a.params[k], b.params[k], rtol=0, atol=1e-4)
    assert int(b.step) == 3
    with pytest.raises(ValueError, match="compile must be"):
        step.make_train_step(model, tx, compile="sometimes")


# A fresh process (an earlier test's run may have tuned this one already): a 64 MiB block is
# mmapped by default (glibc's dynamic threshold stops at 32 MiB) and given back when freed; after
# the tuning it comes from the heap (mallinfo2's mmapped bytes do not grow) and stays there when
# freed (the heap's free bytes hold it).
_MALLOC_PROBE = """
import ctypes, json
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks fsmblks "
                                               "uordblks fordblks keepcost").split()]
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 64 << 20
def probe():
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(SIZE)
    mapped = libc.mallinfo2().hblkhd - before >= SIZE
    libc.free(block)
    return {"mmapped": mapped, "kept_after_free": libc.mallinfo2().fordblks >= SIZE}
default = probe()
from fashion_func.cli import device
applied = device.keep_freed_memory_in_heap()
print(json.dumps({"default": default, "applied": applied, "tuned": probe()}))
"""


def _glibc_version() -> tuple[int, ...]:
    name, version = platform.libc_ver()
    return tuple(int(v) for v in version.split(".")[:2]) if name == "glibc" and version else ()


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or _glibc_version() < (2, 33),
    reason="observes glibc's malloc (mallinfo2: glibc 2.33+)",
)
def test_cpu_allocator_tuning_keeps_large_blocks_in_the_heap():
    proc = subprocess.run([sys.executable, "-c", _MALLOC_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {
        "default": {"mmapped": True, "kept_after_free": False},
        "applied": True,
        "tuned": {"mmapped": False, "kept_after_free": True},
    }


def test_cpu_allocator_tuning_is_skipped_where_it_cannot_apply(monkeypatch):
    """Made-up platforms: not Linux, no C library found, a libc without mallopt, or one whose
    mallopt refuses (musl's returns 0): nothing changed, and False."""
    import ctypes
    import ctypes.util

    from fashion_func.cli import device as device_lib

    class NoMallopt:
        pass

    class Refusing:
        def mallopt(self, param: int, value: int) -> int:
            return 0

    calls = []

    class Accepting:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    with monkeypatch.context() as m:
        m.setattr(sys, "platform", "darwin")
        assert device_lib.keep_freed_memory_in_heap() is False
    with monkeypatch.context() as m:
        m.setattr(ctypes.util, "find_library", lambda name: None)
        assert device_lib.keep_freed_memory_in_heap() is False
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libc.so.6")
    for libc, want in ((NoMallopt(), False), (Refusing(), False), (Accepting(), True)):
        monkeypatch.setattr(ctypes, "CDLL", lambda name, libc=libc: libc)
        assert device_lib.keep_freed_memory_in_heap(1 << 20) is want
    # <malloc.h>: M_MMAP_THRESHOLD (-3) to a quarter of the limit, M_TRIM_THRESHOLD (-1) to it
    assert calls == [(-3, 1 << 18), (-1, 1 << 20)]


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(monkeypatch):
    """bf16 convolutions without oneDNN's bf16 (AVX512-BF16/AMX) run PyTorch's slow reference
    kernels: the run says so, in one line, and only then."""
    from fashion_func.cli import device as device_lib

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(device_lib, "cpu_bf16_supported", lambda: False)
    warning = device_lib.precision_warning(cpu, "bf16")
    assert warning is not None and "\n" not in warning and "fp32 is faster" in warning
    assert device_lib.precision_warning(cpu, "fp32") is None
    assert device_lib.precision_warning(cuda, "bf16") is None
    monkeypatch.setattr(device_lib, "cpu_bf16_supported", lambda: True)
    assert device_lib.precision_warning(cpu, "bf16") is None


def test_cpu_bf16_support_matches_the_convolution_backend_pytorch_picks():
    """The check agrees with what a bf16 convolution actually dispatches to on this CPU."""
    from torch.profiler import profile

    from fashion_func.cli import device as device_lib

    x = torch.randn(8, 32, 14, 14, dtype=torch.bfloat16)  # SimpleNet's second convolution
    w = torch.randn(64, 32, 3, 3, dtype=torch.bfloat16)
    with profile() as prof:
        torch.nn.functional.conv2d(x, w)
    names = {e.key for e in prof.key_averages()}
    assert ("aten::mkldnn_convolution" in names) == device_lib.cpu_bf16_supported()
