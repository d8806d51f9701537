"""The method contract (soco_d2.modeling.meta_arch.method): SoCo and DetCo implement it."""
import math

import pytest
import torch

from soco_d2.config import get_cfg
from soco_d2.engine.monitors import embedding_module, probe_feature_fn
from soco_d2.modeling import build_model
from soco_d2.modeling.meta_arch.detco import DetCo
from soco_d2.modeling.meta_arch.method import PretrainMethod
from soco_d2.modeling.meta_arch.soco import SoCo


def _tiny(arch):
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", arch, "MODEL.RESNETS.DEPTH", 18,
                         "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.ROI_BOX_HEAD.NUM_CONV", 1,
                         "MODEL.ROI_BOX_HEAD.CONV_DIM", 8, "MODEL.ROI_BOX_HEAD.FC_DIM", 24,
                         "MODEL.SOCO.PROJECTOR_HIDDEN_DIM", 16, "MODEL.SOCO.PROJECTOR_OUT_DIM", 8,
                         "MODEL.SOCO.PREDICTOR_HIDDEN_DIM", 16, "MODEL.DETCO.QUEUE_SIZE", 16,
                         "SOLVER.IMS_PER_BATCH", 2, "MODEL.DETCO.FEATURE_DIM", 8,
                         "MODEL.DETCO.HEAD_HIDDEN_DIM", 16])
    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.mark.parametrize("arch", ["SoCo", "DetCo"])
def test_soco_and_detco_implement_the_contract(arch):
    model = _tiny(arch)
    assert isinstance(model, PretrainMethod)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        features = probe_feature_fn(model, None, None)(images)  # the model's own normalisation
        direct = model.probe_features(model.normalize(images))
    assert list(features) == list(direct) == (["res5", "box"] if arch == "SoCo" else ["res5"])
    assert all(torch.equal(features[k], direct[k]) for k in direct)
    assert embedding_module(model) is model.embedding_module()
    online, target = zip(*model.momentum_pairs())
    with torch.no_grad():
        for t in target:
            for p in t.parameters():
                p.zero_()
    model.momentum_update(0.25)  # target = 0.25 * 0 + 0.75 * online
    for o, t in zip(online, target):
        for po, pt in zip(o.parameters(), t.parameters()):
            torch.testing.assert_close(pt, 0.75 * po)
    assert model.chance_level == (math.log(17) if arch == "DetCo" else None)
    assert model.sync_batchnorm is (arch == "SoCo")  # DetCo's default KEY_BN "shuffle": per-process BN


def test_a_method_missing_part_of_the_contract_cannot_be_built():
    class NoProbe(PretrainMethod):
        def normalize(self, images):
            return images.float()

        def momentum_pairs(self):
            return []

        def embedding_module(self):
            return self

    with pytest.raises(TypeError, match="probe_features"):
        NoProbe()
    assert issubclass(SoCo, PretrainMethod) and issubclass(DetCo, PretrainMethod)
