"""`fit` knows whether `train_data` can continue an epoch exactly from a mid-epoch checkpoint.

Exact: `data.EpochBatches`, a function taking `start=`, or an object with `state_dict()` /
`load_state_dict()` (torchdata's `StatefulDataLoader`, its state saved in last.safetensors).
Anything else is refused unless `allow_inexact_resume=True`.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fashion_func import checkpoint, loop, optim
from fashion_func import state as state_lib
from fashion_func.loop import RunError
from fashion_func.loop.batches import decode_state, encode_state, resume_kind

StatefulDataLoader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader
# torchdata 0.11 calls a torch API that torch deprecates, on every loader it builds
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")

TX = optim.sgd(0.05)
X = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))


def fresh() -> state_lib.TrainState:
    return state_lib.create({"w": torch.full((4,), 0.5)}, TX)


def train_step(st, batch):
    """Least squares towards 1 (the gradient depends on w, so the batch order shows in w)."""
    (x,) = batch
    residual = x @ st.params["w"] - 1.0
    grads = {"w": 2 * residual @ x / x.shape[0]}
    updates, opt_state = TX.update(grads, st.opt_state, st.params)
    new = st.replace(step=st.step + 1, params=optim.apply_updates(st.params, updates), opt_state=opt_state)
    return new, {"loss_sum": (residual**2).sum(), "count": torch.tensor(x.shape[0])}


def stateful_loader() -> StatefulDataLoader:
    """A shuffled loader whose sampler seeds its own generator (from the global RNG, seeded here
    without leaking). Not `generator=`: the loader then also draws each epoch's base seed from
    that generator, and torchdata restores only the sampler's part, so the epoch after a
    resumed one would be shuffled differently."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return StatefulDataLoader(TensorDataset(X), batch_size=4, shuffle=True)


def test_the_kinds_of_data():
    assert resume_kind(lambda epoch, start=0: []) == "start"
    assert resume_kind(lambda epoch: []) is None
    assert resume_kind([1, 2]) is None
    assert resume_kind(DataLoader(TensorDataset(X), shuffle=True)) is None
    assert resume_kind(stateful_loader()) == "state"


def test_a_loader_state_survives_json():
    loader = stateful_loader()
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    back = decode_state(encode_state(state))
    gen = state["_sampler_iter_state"]["sampler_iter_state"]["generator"]
    assert torch.equal(back["_sampler_iter_state"]["sampler_iter_state"]["generator"], gen)
    assert back["_num_yielded"] == state["_num_yielded"] == 1


def test_a_shuffled_stateful_loader_resumes_bitwise_mid_epoch(tmp_path):
    straight = loop.fit(fresh(), train_step, stateful_loader(), epochs=3, run_dir=tmp_path / "a")
    cut = loop.fit(fresh(), train_step, stateful_loader(), epochs=3, run_dir=tmp_path / "b", max_steps=13)
    assert cut.stop_reason == "max_steps 13 reached"
    _, meta = checkpoint.load_state(tmp_path / "b" / "checkpoints" / loop.LAST, fresh())
    assert meta["in_epoch"]["batch"] == 3 and "data_state" in meta["in_epoch"]
    # a new process: a new loader from the same seed, positioned by the saved state
    resumed = loop.fit(
        fresh(), train_step, stateful_loader(), epochs=3, run_dir=tmp_path / "b", resume="auto"
    )
    assert torch.equal(resumed.state.params["w"], straight.state.params["w"])
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    # the order matters: restarting the epoch from its start would not give the same weights
    skipped = loop.fit(fresh(), train_step, list(stateful_loader()), epochs=1)
    assert not torch.equal(skipped.state.params["w"], straight.state.params["w"])


@pytest.mark.parametrize("make", [lambda: DataLoader(TensorDataset(X), batch_size=4, shuffle=True), lambda: [
    (X[i : i + 4],) for i in range(0, 40, 4)]], ids=["shuffled DataLoader", "list"])  # fmt: skip
def test_other_data_is_refused_mid_epoch_unless_allowed(tmp_path, make, caplog):
    loop.fit(fresh(), train_step, make(), epochs=2, run_dir=tmp_path / "r", max_steps=13)
    before = (tmp_path / "r" / "checkpoints" / loop.LAST).read_bytes()
    with pytest.raises(RunError, match=r"allow_inexact_resume=True") as info:
        loop.fit(fresh(), train_step, make(), epochs=2, run_dir=tmp_path / "r", resume="auto")
    assert info.value.kind == "inexact_resume" and "epoch 2, batch 3" in str(info.value)
    assert (tmp_path / "r" / "checkpoints" / loop.LAST).read_bytes() == before  # nothing trained
    log = logging.getLogger("test_resume_data")
    with caplog.at_level(logging.WARNING, logger=log.name):
        res = loop.fit(fresh(), train_step, make(), epochs=2, run_dir=tmp_path / "r", resume="auto",
                       allow_inexact_resume=True, log=log)  # fmt: skip
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "first 3 batches are drawn again and dropped" in warnings[0].getMessage()
    assert res.epochs_run == 1 and int(res.state.step) == 20  # epoch 2's remaining 7 steps


def test_a_function_taking_start_resumes_without_being_allowed(tmp_path):
    batches = [(X[i : i + 4],) for i in range(0, 40, 4)]

    def by_epoch(epoch, start=0):
        return batches[start:]

    loop.fit(fresh(), train_step, by_epoch, epochs=2, run_dir=tmp_path / "r", max_steps=13)
    res = loop.fit(fresh(), train_step, by_epoch, epochs=2, run_dir=tmp_path / "r", resume="auto")
    straight = loop.fit(fresh(), train_step, batches, epochs=2)
    assert torch.equal(res.state.params["w"], straight.state.params["w"])
