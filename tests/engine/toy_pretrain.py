"""A tiny meta-architecture and dataset for the engine tests (imported by path from the tests).

The model has BatchNorm (so SyncBN matters), an EMA target network, a queue buffer and uses
the torch RNG in its forward (so exact resume needs the RNG states).
"""
import copy

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from soco_d2.config import get_cfg
from soco_d2.modeling import META_ARCH_REGISTRY


@META_ARCH_REGISTRY.register()
class EngineToyNet(nn.Module):
    def __init__(self, cfg, noise: float = 0.05, queue_size: int = 8):
        super().__init__()
        self.online = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4),
        )
        self.predictor = nn.Linear(4, 4)
        self.target = copy.deepcopy(self.online)
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", torch.zeros(queue_size))
        self.noise = noise
        self.calls = 0
        self.fail_at_call = None  # raise in this forward call (simulated crash)
        self.nan_at_call = None  # return a NaN loss in this forward call
        self.seen = None  # a list: every forward appends its batch's images

    def forward(self, batch):
        call, self.calls = self.calls, self.calls + 1
        if call == self.fail_at_call:
            raise RuntimeError("simulated crash")
        if self.seen is not None:
            self.seen.append(batch["image"].clone())
        x = batch["image"].float() / 255.0
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        q = self.predictor(self.online(x))
        with torch.no_grad():
            k = self.target(batch["image"].float() / 255.0)
            self.queue.copy_(torch.roll(self.queue, 1))
            self.queue[0] = k.mean()
        loss = (q - k).pow(2).sum(dim=1).mean()
        if call == self.nan_at_call:
            loss = loss * float("nan")
        return {"loss_match": loss, "loss_small": 0.1 * q.pow(2).mean(),
                "feat_norm": q.detach().norm(dim=1).mean()}

    @torch.no_grad()
    def momentum_update(self, m: float):
        for pt, po in zip(self.target.parameters(), self.online.parameters()):
            pt.mul_(m).add_(po.detach(), alpha=1 - m)


class ToyDataset(Dataset):
    """Random 8x8 images drawn from the sample seed; ``skip_every``: report skipped images."""

    def __init__(self, n: int = 40, skip_every: int = 0):
        self.n, self.skip_every = n, skip_every

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        index, seed = key
        rng = np.random.default_rng(seed)
        img = rng.integers(0, 256, size=(3, 8, 8), dtype=np.uint8)
        img[0, 0, 0] = index
        skipped = 1 if self.skip_every and index % self.skip_every == 0 else 0
        return {"image": torch.from_numpy(img), "num_skipped": skipped}


def toy_cfg(output_dir, **overrides):
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "EngineToyNet"
    cfg.MODEL.DEVICE = "cpu"
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.SEED = 3
    cfg.SOLVER.IMS_PER_BATCH = 8
    cfg.SOLVER.BASE_LR = 0.5
    cfg.SOLVER.BASE_LR_BATCH_SIZE = 8
    cfg.SOLVER.LARS_TRUST_COEF = 0.02
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.MAX_ITER = 6
    cfg.SOLVER.EPOCHS = 6
    cfg.SOLVER.WARMUP_EPOCHS = 2
    cfg.SOLVER.CHECKPOINT_PERIOD = 3
    cfg.LOG_PERIOD = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.BAD_IMAGE_MIN_SAMPLES = 16
    for k, v in overrides.items():
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, v)
    return cfg


def train_and_dump(output_dir, dump_path, overrides, sync_batchnorm=True):
    """Train the toy model without input noise (so every process count sees the same data) and
    let rank 0 save the final state dict and the last gradients to ``dump_path``."""
    from soco_d2.engine.trainer import PretrainTrainer
    from soco_d2.utils import comm

    cfg = toy_cfg(output_dir, **overrides)
    torch.manual_seed(0)
    model = EngineToyNet(cfg, noise=0.0)
    model.sync_batchnorm = sync_batchnorm  # False: the model asks to keep per-process BN
    trainer = PretrainTrainer(cfg, model=model, dataset=ToyDataset())
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    if comm.is_main_process():
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"state": model.state_dict(), "grads": grads,
                    "bn_type": type(model.online[1]).__name__}, dump_path)
