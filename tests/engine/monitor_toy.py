"""The engine's toy model with what the monitors need (imported by path from the tests, also in
spawned processes): ``probe_features`` and a ``projector``; a labelled folder of tiny images."""
import json
import os
import sys

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import toy_pretrain as toy  # noqa: E402


class MonitorToyNet(toy.EngineToyNet):
    """``online`` = conv, BN, ReLU, pool, flatten, fc, BN1d; the fc is the "projector"."""

    @property
    def projector(self):
        return self.online[5]

    def probe_features(self, x):
        if not self.online[1].training:  # the statistics the probe normalises with (BN_STATS)
            self.probe_bn_means.append(self.online[1].running_mean.clone())
        return {"pool": self.online[:5](x)}

    @property
    def probe_bn_means(self):
        if "_probe_bn_means" not in self.__dict__:
            self.__dict__["_probe_bn_means"] = []
        return self.__dict__["_probe_bn_means"]


def make_labeled_folder(root, classes=("red", "green", "blue"), per_class=6, size=20, seed=0):
    """One sub-folder per class; images are noisy patches of the class colour."""
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200),
               "grey": (128, 128, 128)}
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            img = np.clip(np.array(colours.get(c, (90, 90, 90)), np.float32)
                          + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(os.path.join(root, c, f"{i:03d}.png"), img[:, :, ::-1])
    return str(root)


def monitor_overrides(probe_root, **extra):
    out = {"MONITOR.KNN.ENABLED": True, "MONITOR.KNN.TRAIN_ROOT": str(probe_root),
           "MONITOR.KNN.PERIOD": 2, "MONITOR.KNN.IMAGE_SIZE": 16, "MONITOR.KNN.K": 3,
           "MONITOR.KNN.BATCH_SIZE": 4, "MONITOR.HEALTH.ENABLED": True,
           "MONITOR.HEALTH.WINDOW": 64}
    out.update(extra)
    return out


def train_and_dump(output_dir, dump_path, overrides, sync_batchnorm=True):
    """Train the toy (no input noise) with ``overrides``; rank 0 saves the final state dict and
    the metrics rows, every rank the BN means its probes saw (``dump_path.bn<rank>``)."""
    from soco_d2.engine.trainer import PretrainTrainer
    from soco_d2.utils import comm

    cfg = toy.toy_cfg(output_dir, **overrides)
    torch.manual_seed(0)
    model = MonitorToyNet(cfg, noise=0.0)
    model.sync_batchnorm = sync_batchnorm  # False: per-process BN, as DetCo's shuffle-BN
    trainer = PretrainTrainer(cfg, model=model, dataset=toy.ToyDataset())
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    torch.save(model.probe_bn_means, f"{dump_path}.bn{comm.get_rank()}")
    if comm.is_main_process():
        with open(os.path.join(output_dir, "metrics.json")) as f:
            rows = [json.loads(line) for line in f]
        torch.save({"state": model.state_dict(), "rows": rows}, dump_path)


def tiny_method(arch, **kv):
    """(cfg, model in eval mode) of a tiny CPU SoCo or DetCo, ``kv`` config overrides added."""
    from soco_d2.config import get_cfg
    from soco_d2.modeling import build_model

    cfg = get_cfg()
    opts = ["MODEL.META_ARCHITECTURE", arch, "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18]
    if arch == "SoCo":
        opts += ["MODEL.FPN.OUT_CHANNELS", 16, "MODEL.ROI_BOX_HEAD.NUM_CONV", 1,
                 "MODEL.ROI_BOX_HEAD.CONV_DIM", 8, "MODEL.ROI_BOX_HEAD.FC_DIM", 24,
                 "MODEL.SOCO.PROJECTOR_HIDDEN_DIM", 16, "MODEL.SOCO.PROJECTOR_OUT_DIM", 8,
                 "MODEL.SOCO.PREDICTOR_HIDDEN_DIM", 16]
    else:
        opts += ["MODEL.DETCO.QUEUE_SIZE", 16, "SOLVER.IMS_PER_BATCH", 2,
                 "MODEL.DETCO.FEATURE_DIM", 8, "MODEL.DETCO.HEAD_HIDDEN_DIM", 16]
    cfg.merge_from_list(opts + [x for kv_ in kv.items() for x in kv_])
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()
