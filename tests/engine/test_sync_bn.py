import torch
from fvcore.nn.precise_bn import get_bn_modules
from torch import nn

from soco_d2.engine.sync_bn import GlooSyncBatchNorm, convert_sync_batchnorm, sync_batchnorm_to_gloo


def test_sync_batchnorm_to_gloo_replaces_torchs_syncbn_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.Sequential(nn.BatchNorm2d(4)))
    running = model[1].running_mean
    out = sync_batchnorm_to_gloo(model)
    assert isinstance(out[1], GlooSyncBatchNorm) and type(out[2][0]) is nn.BatchNorm2d
    assert out[1].running_mean is running  # buffers shared, names kept
    assert set(out.state_dict()) == set(model.state_dict())
    # one process: plain batch norm
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(out[1](x), nn.functional.batch_norm(x, None, None, training=True))


def test_gloo_syncbn_is_found_by_precise_bn():
    """fvcore's precise BN looks BN layers up by type; the CPU SyncBN must be among them."""
    model = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm1d(4)),
                                   torch.device("cpu"))
    assert [type(m) for m in get_bn_modules(model)] == [GlooSyncBatchNorm, GlooSyncBatchNorm]
    y = model[2](torch.randn(6, 4))  # still accepts 2D input (a converted BatchNorm1d)
    assert y.shape == (6, 4)
