"""Command-line arguments shared by the ``tools/`` entry points (detectron2's surface)."""
import argparse
import os
import sys


class _ArgumentParser(argparse.ArgumentParser):
    """Refuses an option placed among the trailing ``KEY VALUE`` overrides, naming it."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        flags = {s for a in self._actions for s in a.option_strings}
        for item in getattr(namespace, "opts", None) or []:
            name = item.split("=", 1)[0]
            if name in flags:
                self.error(
                    f"option {name} appears among the KEY VALUE overrides "
                    f"({' '.join(namespace.opts)}); options go before them, e.g. "
                    f"{self.prog} --config-file cfg.yaml {item} OUTPUT_DIR out")
        return namespace, extra


def default_argument_parser(epilog: str = None, eval_only: bool = True) -> argparse.ArgumentParser:
    """``--config-file``, ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``,
    ``--resume``, ``--eval-only`` (only with ``eval_only``: tools that can evaluate a model) and
    trailing ``KEY VALUE`` config overrides."""
    prog = sys.argv[0]
    if epilog is None:
        epilog = f"""
Examples:

Single machine, 8 GPUs:
    $ {prog} --num-gpus 8 --config-file cfg.yaml

Change config values on the command line:
    $ {prog} --config-file cfg.yaml SOLVER.IMS_PER_BATCH 256 OUTPUT_DIR out/

Several machines (run on each one, machine 0 first):
    (machine 0)$ {prog} --machine-rank 0 --num-machines 2 --dist-url tcp://<ip of machine 0>:<port> [args]
    (machine 1)$ {prog} --machine-rank 1 --num-machines 2 --dist-url tcp://<ip of machine 0>:<port> [args]

Under torchrun or srun the rank variables of the environment are used instead of
--num-gpus/--num-machines/--machine-rank/--dist-url (see docs/TRAINING.md).
On a machine without GPUs (MODEL.DEVICE cpu), --num-gpus N starts N CPU processes (gloo).
"""
    parser = _ArgumentParser(
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="resume from OUTPUT_DIR/last_checkpoint if it exists (otherwise start fresh)",
    )
    if eval_only:
        parser.add_argument("--eval-only", action="store_true", help="perform evaluation only")
    parser.add_argument(
        "--num-gpus", type=int, default=1, help="processes per machine (one per GPU; CPU processes on CPU)"
    )
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument(
        "--machine-rank", type=int, default=0, help="the rank of this machine (unique per machine)"
    )
    parser.add_argument(
        "--dist-url",
        default="auto",
        help="initialization URL for torch.distributed, e.g. tcp://host:port; "
        "'auto' picks a free local port (single machine only)",
    )
    parser.add_argument(
        "opts",
        help="Modify config options at the end of the command: space-separated KEY VALUE pairs, "
        "e.g. SOLVER.BASE_LR 0.5 OUTPUT_DIR out/",
        default=None,
        nargs=argparse.REMAINDER,
    )
    return parser


def check_before_launch(cfg, args) -> None:
    """Checks of a training tool's command line that need the process layout, run before any
    process starts: ``OUTPUT_DIR`` (a folder, writable, not in use by another run; see
    :mod:`soco_d2.engine.output_dir`) and ``SOLVER.IMS_PER_BATCH`` divisible by the number of
    processes times ``SOLVER.GRAD_ACCUM_STEPS``. Raise :class:`~soco_d2.config.ConfigError` /
    :class:`~soco_d2.engine.output_dir.OutputDirError` naming the key."""
    from soco_d2.config import ConfigError
    from soco_d2.data.loader import per_process_batch_size

    from .launch import dist_env_from_environ
    from .output_dir import check_output_dir

    env = dist_env_from_environ()
    world = env.world_size if env is not None else args.num_gpus * args.num_machines
    try:
        per_process_batch_size(cfg, world)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # The lock is tested only where the job's main process runs (machine rank 0, rank 0 of a
    # job started by torchrun or SLURM): other machines may share the folder.
    main = args.machine_rank == 0 if env is None else env.rank == 0
    check_output_dir(cfg.OUTPUT_DIR, lock=main)


def run_tool(cli) -> None:
    """Run a tool's ``cli()`` and exit with its code; an error in the command line, the config
    or ``OUTPUT_DIR`` is printed as one message (no traceback) and exits with 2."""
    from soco_d2.config import ConfigError

    from .output_dir import OutputDirError

    try:
        code = cli()
    except (ConfigError, OutputDirError) as e:
        sys.stderr.write(f"{os.path.basename(sys.argv[0])}: error: {e}\n")
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
