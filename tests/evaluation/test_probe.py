"""BN statistics recomputed for the probe on several processes (the single-process behaviour
and the command line are tested in tests/tools/test_probe.py)."""
import os
import time
from datetime import timedelta

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from soco_d2.modeling.sync_bn import convert_sync_batchnorm
from soco_d2.evaluation.knn import ProbeImages
from soco_d2.evaluation.probe import load_probe_backbone, recompute_bn_statistics

SIZE = 16


def _image_files(root, n, unreadable):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = os.path.join(root, f"{i:03d}.png")
        if i in unreadable:
            with open(path, "w") as f:
                f.write("not an image")
        else:
            cv2.imwrite(path, rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
        paths.append(path)
    return paths


def _statistics(paths, batch_size):
    net = load_probe_backbone(random_init=True, depth=18, seed=0).model
    net = convert_sync_batchnorm(net, torch.device("cpu"))
    used = recompute_bn_statistics(net, ProbeImages(paths, SIZE), torch.device("cpu"), batch_size)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    return used, [torch.cat([m.running_mean, m.running_var]) for m in bns], \
        [int(m.num_batches_tracked) for m in bns]


def _worker(rank, init_file, paths, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        torch.save(_statistics(paths, batch_size=3), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_uneven_shares_run_the_same_synchronised_passes_as_one_process(tmp_path):
    """11 images, the second unreadable: process 0 holds 6 readable, process 1 holds 4. With 3
    images per process and pass, per-process batching would give process 0 two passes and
    process 1 one, and a synchronised BN would wait for a partner that never comes. Both now run
    the passes of one process with 6 images per pass (6 + 4 images) and get its statistics."""
    paths = _image_files(tmp_path, 11, unreadable={1})
    ctx = mp.start_processes(_worker, args=(str(tmp_path / "init"), paths, str(tmp_path)),
                             nprocs=2, start_method="spawn", join=False)
    deadline = time.time() + 240
    try:
        while not ctx.join(timeout=5):
            assert time.time() < deadline, "the two processes did not finish: a collective hangs"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    used, expected, passes = _statistics(paths, batch_size=6)
    assert used == 10 and passes[0] == 2
    for u, stats, counts in got:
        assert u == used and counts == passes
        for a, b in zip(stats, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
