"""A test-only pretraining method: image-level BYOL on the method contract, in this file alone.

``add_toy_byol_config(cfg)`` adds its keys, importing the file registers ``ToyBYOL`` in
``META_ARCH_REGISTRY`` and ``ToyBYOLViewMapper`` in ``MAPPER_REGISTRY``; nothing else in the
project knows it (docs/ARCHITECTURE.md, "Adding a method").
"""
import copy

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from fvcore.common.config import CfgNode
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from soco_d2.data.registry import MAPPER_REGISTRY
from soco_d2.data.view_mapper import ViewMapper
from soco_d2.data.visualize import hstack_panels
from soco_d2.modeling.meta_arch.build import META_ARCH_REGISTRY
from soco_d2.modeling.meta_arch.method import PretrainMethod


def add_toy_byol_config(cfg):
    """``MODEL.TOY_BYOL``: the view size (px) and the projection width."""
    cfg.MODEL.TOY_BYOL = CfgNode({"VIEW_SIZE": 32, "DIM": 16})
    return cfg


def _mlp(in_dim, dim):
    return nn.Sequential(nn.Linear(in_dim, 2 * dim), nn.BatchNorm1d(2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))


@MAPPER_REGISTRY.register()
class ToyBYOLViewMapper(ViewMapper):
    """Two random crops (a half to all of each side), each flipped with probability 1/2."""

    uses_proposals = False
    sheet_name = "toy_byol"

    def __init__(self, cfg):
        self.size = int(cfg.MODEL.TOY_BYOL.VIEW_SIZE)

    def _view(self, image, rng):
        h, w = image.shape[:2]
        ch, cw = (int(rng.integers(max(1, s // 2), s + 1)) for s in (h, w))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        view = cv2.resize(image[y:y + ch, x:x + cw], (self.size, self.size), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(view[:, ::-1] if rng.random() < 0.5 else view)

    def __call__(self, image, proposals, rng):
        views = np.stack([self._view(image, rng) for _ in range(2)])  # (2, S, S, 3)
        return {"views": torch.from_numpy(views).permute(0, 3, 1, 2).contiguous()}

    def view_sheet(self, image, rng, panel=224, proposals=None, filtered=None):
        views = self(image, None, rng)["views"].permute(0, 2, 3, 1).numpy()
        s = max(1, panel // self.size)
        return hstack_panels([np.ascontiguousarray(np.repeat(np.repeat(v, s, 0), s, 1)) for v in views])


@META_ARCH_REGISTRY.register()
class ToyBYOL(PretrainMethod):
    """BYOL (Grill et al. 2020) on whole images: a ResNet-18 online encoder with projector and
    predictor, an EMA target encoder with projector; the symmetric loss ``2 - 2 cos(q, k)``."""

    def __init__(self, cfg):
        super().__init__()
        dim = int(cfg.MODEL.TOY_BYOL.DIM)
        resnet = torchvision.models.resnet18(weights=None)
        self.encoder = IntermediateLayerGetter(resnet, return_layers={"layer4": "res5"})
        self.projector = _mlp(512, dim)
        self.predictor = _mlp(dim, dim)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ the contract
    def normalize(self, images):
        shape = images.shape
        x = images.to(self.pixel_mean.device).reshape(-1, *shape[-3:]).float()
        return ((x - self.pixel_mean) / self.pixel_std).view(shape)

    def momentum_pairs(self):
        return [(self.encoder, self.target_encoder), (self.projector, self.target_projector)]

    def probe_features(self, images):
        return {"res5": self.encoder(images)["res5"].mean(dim=(2, 3))}

    def embedding_module(self):
        return self.projector[-1]

    # ------------------------------------------------------------------ training
    def forward(self, batch):
        views = self.normalize(batch["views"])  # (N, 2, 3, S, S)
        x = views.transpose(0, 1).flatten(0, 1)  # view-major: view 0 of every image, then view 1
        q = self.predictor(self.projector(self.probe_features(x)["res5"]))
        with torch.no_grad():
            k = self.target_projector(self.target_encoder(x)["res5"].mean(dim=(2, 3)))
        k = k.roll(len(k) // 2, dims=0)  # each view's target is the other view
        return {"loss_byol": (2 - 2 * F.cosine_similarity(q, k, dim=1)).mean()}
