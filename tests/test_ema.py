"""optim.ema: the moving average of the weights, against torch.optim.swa_utils.AveragedModel."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fashion_func import callbacks, loop, models, optim
from fashion_func import state as state_lib
from fashion_func.step import make_train_step
from tests.reference import TwoLayerNet


def _data(n: int = 64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 784, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.cross_path
def test_ema_equals_averaged_model_updated_after_each_torch_adam_step():
    decay = 0.9
    model = models.get("mlp")
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    tx = optim.chain(optim.adam(1e-2), optim.ema(decay))
    st = state_lib.create(params, tx)
    step = make_train_step(model, tx, preprocess=None, compile=False)

    ref = TwoLayerNet(784, 100, 10).double()
    ref.load_state_dict(params)
    averaged = AveragedModel(ref, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    x, y = _data()
    for i in range(5):
        xb, yb = x[i * 8 : i * 8 + 8], y[i * 8 : i * 8 + 8]
        st, _ = step(st, (xb, yb))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(xb), yb).backward()
        opt.step()
        averaged.update_parameters(ref)
    ours = optim.ema_params(st.opt_state)
    theirs = {k.removeprefix("module."): v for k, v in averaged.state_dict().items() if k != "n_averaged"}
    assert int(st.opt_state[1].count) == int(averaged.n_averaged) == 5
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-12, rtol=0)
        assert not torch.equal(ours[k], st.params[k])  # an average, not the last weights


def test_ema_passes_updates_through_and_errors_are_clear():
    params = {"w": torch.ones(3)}
    tx = optim.ema(0.5)
    s = tx.init(params)
    updates, s = tx.update({"w": torch.full((3,), 2.0)}, s, params)
    assert torch.equal(updates["w"], torch.full((3,), 2.0))
    assert torch.equal(optim.ema_params(s)["w"], torch.full((3,), 3.0))  # the first step copies
    _, s = tx.update({"w": torch.full((3,), 4.0)}, s, {"w": torch.full((3,), 3.0)})
    assert torch.equal(optim.ema_params(s)["w"], torch.full((3,), 5.0))  # 0.5 * 3 + 0.5 * 7
    assert float(optim.get_hyperparam(s, "decay")) == 0.5
    with pytest.raises(ValueError, match="decay"):
        optim.ema(1.5)
    with pytest.raises(KeyError, match="no ema"):
        optim.ema_params(optim.adam(1e-3).init(params))


def test_fit_can_keep_the_ema_weights_as_best_and_resumes_exactly(tmp_path):
    model = models.get("mlp")
    tx = optim.chain(optim.adam(1e-2), optim.ema(0.8))
    step = make_train_step(model, tx, preprocess=None, compile=False)
    x, y = _data()
    batches = [(x[i : i + 16].float(), y[i : i + 16]) for i in range(0, 64, 16)]

    def fresh():
        return state_lib.create(model.init(torch.Generator().manual_seed(0)), tx)

    def ema_weights(st):
        return optim.ema_params(st.opt_state)

    cb = [callbacks.ModelCheckpoint(monitor="train_loss")]
    straight = loop.fit(
        fresh(), step, batches, epochs=3, callbacks=cb, run_dir=tmp_path / "a", weights=ema_weights
    )
    best = load_file(tmp_path / "a" / "checkpoints" / "best.safetensors")
    final_ema = optim.ema_params(straight.state.opt_state)
    assert straight.best["epoch"] == 3  # the loss still falls: the last epoch is the best
    for k, v in best.items():
        assert torch.equal(v, final_ema[k]) and not torch.equal(v, straight.state.params[k])
    loop.fit(
        fresh(),
        step,
        batches,
        epochs=3,
        callbacks=cb,
        run_dir=tmp_path / "b",
        max_steps=6,
        weights=ema_weights,
    )
    resumed = loop.fit(
        fresh(),
        step,
        batches,
        epochs=3,
        callbacks=cb,
        run_dir=tmp_path / "b",
        resume="auto",
        weights=ema_weights,
        allow_inexact_resume=True,
    )  # fmt: skip  (a list: same order)
    for k in final_ema:
        assert torch.equal(optim.ema_params(resumed.state.opt_state)[k], final_ema[k])
