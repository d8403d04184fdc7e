"""AdamW (src/adamw.py) against torch.optim.AdamW, in the project's training step and checkpoints."""
import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import nn, Tensor

from src.adamw import AdamW
from src.checkpoint import load_network, load_train_state, save_atomic
from src.config import load_config
from src.errors import ConfigError
from src.factory import NetWithLoss, TrainStep, build_optimizer


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


class _Net(nn.Cell):
    """fc (weight decayed, lr x 5) on a fixed 'feature' layer (no decay): two parameter groups."""

    def __init__(self, w_feat, w_fc):
        super().__init__()
        self.feat = nn.Dense(4, 3, weight_init=Tensor(w_feat), has_bias=False)
        self.fc = nn.Dense(3, 2, weight_init=Tensor(w_fc), has_bias=False)

    def construct(self, x):
        return self.fc(self.feat(x))


def _torch_net(w_feat, w_fc):
    net = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(w_feat))
        net[1].weight.copy_(torch.tensor(w_fc))
    return net


def _setup(steps=5):
    rng = np.random.default_rng(0)
    w_feat, w_fc = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32)
    lr = np.linspace(1e-2, 2e-3, steps).astype(np.float32)  # a per-step schedule, as the project's
    net = _Net(w_feat, w_fc)
    groups = [{"params": [net.feat.weight], "lr": Tensor(lr), "weight_decay": 0.0},
              {"params": [net.fc.weight], "lr": Tensor(lr * 5), "weight_decay": 0.05}]
    step = TrainStep(NetWithLoss(net), AdamW(groups, learning_rate=Tensor(lr)))
    step.set_train(True)
    tnet = _torch_net(w_feat, w_fc)
    topt = torch.optim.AdamW([{"params": tnet[0].parameters(), "weight_decay": 0.0},
                              {"params": tnet[1].parameters(), "weight_decay": 0.05}], lr=1.0)
    data = [(rng.standard_normal((6, 4)).astype(np.float32), rng.integers(0, 2, 6).astype(np.int32))
            for _ in range(steps)]
    return net, step, tnet, topt, lr, data


def _torch_step(tnet, topt, lr, x, y):
    topt.param_groups[0]["lr"], topt.param_groups[1]["lr"] = float(lr), float(lr * 5)
    topt.zero_grad()
    torch.nn.functional.cross_entropy(tnet(torch.tensor(x)), torch.tensor(y, dtype=torch.long)).backward()
    topt.step()


def test_matches_torch_adamw_and_skipped_steps_do_not_count():
    """Two groups (lr and 5 x lr, weight decay 0 and 0.05), the lr changing every step; step 2 gets a
    NaN batch: skipped (no update, AdamW's t unchanged), while the lr schedule moves on."""
    net, step, tnet, topt, lr, data = _setup()
    stop = Tensor(0.0, ms.float32)
    for k, (x, y) in enumerate(data):
        if k == 2:
            _, control = step(Tensor(x * np.nan), Tensor(y), stop)
            assert control.asnumpy()[0] == 1
            continue
        step(Tensor(x), Tensor(y), stop)
        _torch_step(tnet, topt, lr[k], x, y)
    opt = step.optimizer
    assert int(opt.global_step.asnumpy()[0]) == 5 and float(opt.adamw_step.asnumpy()) == 4.0
    np.testing.assert_allclose(net.feat.weight.asnumpy(), tnet[0].weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.fc.weight.asnumpy(), tnet[1].weight.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_state_resumes_from_a_checkpoint(tmp_path):
    net, step, _, _, _, data = _setup()
    for x, y in data[:2]:
        step(Tensor(x), Tensor(y), Tensor(0.0, ms.float32))
    path = str(tmp_path / "latest.ckpt")
    save_atomic(step, path, {"epoch": 0, "step_in_epoch": 2})
    names = {p.name for p in step.get_parameters()}
    assert {"adam_m.feat.weight", "adam_v.fc.weight", "adamw_step"} <= names
    other, step2, _, _, _, _ = _setup()
    load_train_state(step2, path, other)
    for a, b in zip(step.optimizer.get_parameters(), step2.optimizer.get_parameters()):
        if not a.name.startswith("learning_rate"):
            np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=a.name)
    load_network(_setup()[0], path)  # the weights alone: AdamW's state is not an unexpected parameter


def test_config_selects_adamw_and_refuses_staged_finetuning():
    cfg = load_config(["--optimizer=adamw", "--num_classes=3", "--head=gap"])
    opt = build_optimizer(cfg, _Net(np.ones((3, 4), np.float32), np.ones((2, 3), np.float32)), np.full(4, 1e-3, np.float32))
    assert isinstance(opt, AdamW)
    with pytest.raises(ConfigError, match="freeze_backbone_epochs"):
        load_config(["--optimizer=adamw", "--freeze_backbone_epochs=2"])
