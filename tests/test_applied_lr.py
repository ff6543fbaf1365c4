"""The history's lr is the one the optimizer applied in the epoch's last step, read from its state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fashion_func import loop, optim, schedules
from fashion_func import state as state_lib


def warm(count: torch.Tensor) -> torch.Tensor:
    """A warm-up over 5 updates: 1/5, 2/5, ... then 1 (no branch on the value)."""
    return torch.clamp((count + 1.0) / 5.0, max=1.0)


def sgd_run(tx: optim.GradientTransformation):
    """A one-weight model whose gradient is 1: each update is -(the lr applied)."""
    applied: list[np.float32] = []

    def train_step(st, batch):
        grads = {"w": torch.ones(1)}
        updates, opt_state = tx.update(grads, st.opt_state, st.params)
        params = optim.apply_updates(st.params, updates)
        assert torch.equal(params["w"], st.params["w"] + updates["w"])
        applied.append(np.float32(-updates["w"].item()))  # the SGD update over the gradient (1)
        loss = st.params["w"].sum()
        return st.replace(step=st.step + 1, params=params, opt_state=opt_state), {"loss_sum": loss}

    st = state_lib.create({"w": torch.zeros(1)}, tx)
    return st, train_step, applied


def test_history_lr_is_what_sgd_applied_through_a_warmup_and_a_set_lr():
    tx = optim.chain(optim.sgd(0.1), optim.scale_by_schedule(warm))
    st, step, applied = sgd_run(tx)
    batches = [0, 1, 2]  # 3 steps per epoch: the warm-up ends inside epoch 2
    first = loop.fit(st, step, batches, epochs=2, lr_schedule=warm)
    assert [np.float32(r["lr"]) for r in first.history] == [applied[2], applied[5]]
    assert applied[2] == np.float32(0.1) * np.float32(3 / 5) and applied[5] == np.float32(0.1)
    # an lr changed by set_hyperparam between runs: the next epoch's record follows it
    changed = first.state.replace(opt_state=optim.set_hyperparam(first.state.opt_state, "lr", 0.025))
    second = loop.fit(changed, step, batches, epochs=1, lr_schedule=warm)
    assert np.float32(second.history[0]["lr"]) == applied[8] == np.float32(0.025)
    assert second.history[0]["lr"] == 0.025  # shown as the float the user set, not 0.02500000037


def test_history_lr_follows_the_schedule_of_a_onecycle_triangle():
    tri = schedules.triangle(9, 4)
    tx = optim.chain(optim.sgd(0.5), optim.scale_by_schedule(tri))
    st, step, applied = sgd_run(tx)
    res = loop.fit(st, step, [0, 1, 2], epochs=3, lr_schedule=tri)
    got = [np.float32(r["lr"]) for r in res.history]
    assert got == [applied[2], applied[5], applied[8]]
    assert len(set(got)) == 3  # it moves: not the base lr copied on the host


def test_without_a_schedule_the_lr_hyperparameter_is_reported():
    tx = optim.sgd(0.1)
    st, step, applied = sgd_run(tx)
    st = st.replace(opt_state=optim.set_hyperparam(st.opt_state, "lr", 0.2))
    res = loop.fit(st, step, [0, 1], epochs=1)
    assert res.history[0]["lr"] == 0.2 and applied[-1] == np.float32(0.2)


@pytest.mark.parametrize("lrs", [[0.1, 0.1], [0.1, 0.3]])
def test_a_stacked_state_gives_one_lr_or_one_per_member(lrs):
    opt_state = optim.sgd(0.1).init({"w": torch.zeros(1)})
    stacked = optim.set_hyperparam(
        torch.utils._pytree.tree_map(lambda t: torch.stack([t, t]), opt_state), "lr", torch.tensor(lrs)
    )
    got = loop.lr.applied_lr(stacked)
    assert got == (lrs[0] if lrs[0] == lrs[1] else lrs)


def test_without_the_schedule_the_history_says_base_lr_never_lr():
    """A chain that scales the lr per step, `fit` not told the schedule: `lr` would be a rate
    the optimizer did not apply, so the history calls the hyperparameter `base_lr`."""
    st, step, _ = sgd_run(optim.chain(optim.sgd(0.1), optim.scale_by_schedule(warm)))
    res = loop.fit(st, step, [0, 1, 2], epochs=1)
    assert "lr" not in res.history[0] and res.history[0]["base_lr"] == pytest.approx(0.1)
