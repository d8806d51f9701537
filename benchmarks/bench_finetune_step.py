"""Time one fine-tuning step on CPU: tools/train_net.py's loop step vs. a bare torchvision step.

Model: Mask R-CNN R50-FPN, torchvision's v2 design (4conv1fc box head and 4-conv mask head with
BN), built by ``soco_d2.finetune.build_detector`` from ``configs/finetune/mask_rcnn_R50_FPN_1x
.yaml``. Inputs: two 640x640 images with their boxes and masks (a synthetic COCO-format dataset
read through the project's dataset class; short side fixed at 640 so both contestants resize
alike).

* ``train_net`` — ``FinetuneTrainer.run_step``: next batch from the loader (here an iterator over
  the same uint8 batch), learning-rate update, uint8 -> float on the device, forward under the
  optional autocast, backward, SGD step, on-device loss accumulation.
* ``bare``      — ``loss = sum(model(images, targets).values())``, ``zero_grad``,
  ``backward``, ``step`` of a plain ``torch.optim.SGD``, on float images prepared beforehand.

Both train the same model object; steps alternate (the order flips every round) so machine noise
hits both alike. Reports the medians and their ratio (target: at most 1.05), and, because a loaded
machine makes step times noisy, the cost of the work ``run_step`` adds outside the model (lr
update, uint8 -> float, target moves, loss accumulation), timed alone over many repetitions.

Example: ``python benchmarks/bench_finetune_step.py --warmup 3 --timed 5``
"""
import argparse
import tempfile
import time

import torch

from soco_d2.config import load_config
from soco_d2.data.synthetic import make_synthetic_coco
from soco_d2.finetune.coco_data import COCODetection
from soco_d2.finetune.trainer import FinetuneTrainer, _targets_to

from paired_timing import report, run_alternating


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timed", type=int, default=5)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = tempfile.mkdtemp(prefix="bench_finetune_")
    json_file, image_dir = make_synthetic_coco(tmp, 2, image_size=args.size, seed=0)
    cfg = load_config("configs/finetune/mask_rcnn_R50_FPN_1x.yaml", [
        "MODEL.DEVICE", "cpu", "MODEL.NUM_CLASSES", 3, "DATASETS.TRAIN", f"('{json_file}',)",
        "DATASETS.TEST", "()", "INPUT.MIN_SIZE_TRAIN", f"({args.size},)",
        "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", tmp,
    ])
    trainer = FinetuneTrainer(cfg)
    dataset = COCODetection(json_file, image_dir, is_train=True, flip_prob=0.0)
    samples = [dataset[(i, 0)] for i in range(2)]
    batch = ([s[0] for s in samples], [s[1] for s in samples])

    def endless():
        while True:
            yield batch

    trainer._data = endless()
    trainer.writers = []
    trainer._reset_window()
    model = trainer.model
    model.train()
    float_images = [im.float() for im in batch[0]]
    targets = batch[1]
    s = cfg.SOLVER
    bare_opt = torch.optim.SGD(model.parameters(), lr=0.0025, momentum=s.MOMENTUM,
                               weight_decay=s.WEIGHT_DECAY)

    def ours(it):
        trainer.run_step(it)

    def bare(it):
        loss = sum(model(float_images, targets).values())
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()

    contestants = [("train_net", ours), ("bare", bare)]
    print(f"Mask R-CNN R50-FPN v2, 2 images {args.size}x{args.size}, CPU, "
          f"{torch.get_num_threads()} threads; {args.warmup} warmup + {args.timed} timed rounds")
    times, cpu = run_alternating(contestants, args.warmup, args.timed)
    trainer._flush_metrics(args.warmup + args.timed)  # the loop's periodic host sync, once
    med = report(times, cpu)

    # What run_step does besides the bare step's work, timed alone.
    names = trainer._loss_names
    losses = {k: torch.tensor(1.0) for k in names}
    acc = torch.zeros(len(names))
    reps = 200
    t = time.perf_counter()
    for i in range(reps):
        lr = trainer.scheduler.lr_at(i)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        [im.to(trainer.device, non_blocking=True).float() for im in batch[0]]
        _targets_to(batch[1], trainer.device)
        acc = acc + torch.stack([losses[k].detach().float() for k in names])
    extra = (time.perf_counter() - t) / reps
    print(f"work outside the model per step: {extra * 1e3:.2f} ms = "
          f"{100 * extra / med['bare']:.3f}% of the bare step")


if __name__ == "__main__":
    main()
