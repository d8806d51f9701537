"""A tiny SoCo config and batch, shared by the SoCo tests and their spawned processes (imported
by path from the tests)."""
import torch

from soco_d2.config import get_cfg


def tiny_soco_cfg(**overrides):
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "SoCo",
        "MODEL.DEVICE", "cpu",
        "MODEL.RESNETS.DEPTH", 18,
        "MODEL.FPN.OUT_CHANNELS", 16,
        "MODEL.ROI_BOX_HEAD.NUM_CONV", 2,
        "MODEL.ROI_BOX_HEAD.CONV_DIM", 16,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
        "MODEL.SOCO.PROJECTOR_HIDDEN_DIM", 32,
        "MODEL.SOCO.PROJECTOR_OUT_DIM", 16,
        "MODEL.SOCO.PREDICTOR_HIDDEN_DIM", 32,
    ] + [x for kv in overrides.items() for x in kv])
    return cfg


def random_batch(n, k=3, seed=0):
    """N images, views 64/64/32 px, K boxes per pair with sides 0.2-0.9 of the view (P2 and P3),
    ids 0..K-1 on both sides."""
    g = torch.Generator().manual_seed(seed)
    sizes = {"v1": 64, "v2": 64, "v3": 32}
    images = {v: torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8) for v, s in sizes.items()}

    def boxes(size):
        side = (0.2 + 0.7 * torch.rand(n, k, 2, generator=g)) * size
        xy = torch.rand(n, k, 2, generator=g) * (size - side)
        return torch.cat([xy, xy + side], dim=-1)

    ids = torch.arange(k).repeat(n, 1)
    pairs = [{"a": "v1", "b": b, "boxes_a": boxes(64), "boxes_b": boxes(sizes[b]), "ids_a": ids, "ids_b": ids}
             for b in ("v2", "v3")]
    return {"images": images, "pairs": pairs}


def half_batch(batch, rank, world_size):
    """The images of ``rank``'s share of a batch (equal contiguous shares)."""
    n = len(next(iter(batch["images"].values())))
    part = slice(rank * n // world_size, (rank + 1) * n // world_size)
    return {
        "images": {v: x[part] for v, x in batch["images"].items()},
        "pairs": [{k: (v[part] if torch.is_tensor(v) else v) for k, v in p.items()} for p in batch["pairs"]],
    }


def dump_gradients(dump_path, overrides):
    """Build the tiny model (seed 0), convert its BN for this process group as the trainer does,
    run this process's share of ``random_batch(4)`` and save the loss and online gradients."""
    from soco_d2.modeling.sync_bn import convert_sync_batchnorm
    from soco_d2.modeling import build_model
    from soco_d2.utils import comm

    torch.manual_seed(0)
    model = build_model(tiny_soco_cfg(**overrides))
    if comm.get_world_size() > 1:
        model = convert_sync_batchnorm(model, torch.device("cpu"))
    batch = half_batch(random_batch(4), comm.get_rank(), comm.get_world_size())
    loss = sum(model(batch).values())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": loss.detach(), "grads": grads, "buffers": dict(model.box_head.named_buffers())},
               f"{dump_path}.{comm.get_rank()}")
