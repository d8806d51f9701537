#!/usr/bin/env python
"""Compare a fine-tuning run's COCO AP with the number reported in the SoCo / DetCo papers.

Examples:

  python tools/check_ap.py --list
  python tools/check_ap.py output/finetune/mask_rcnn_R50_FPN_1x --reference soco_fpn_100ep_mask_rcnn_1x
  python tools/check_ap.py output/retina --reference detco_200ep_retinanet_1x --tolerance 0.5

Reads the last evaluation results of OUTPUT_DIR/metrics.json and prints reported, measured and
delta per metric, after where the run's weights came from (the pretrained MODEL.WEIGHTS of its
config.yaml and its last checkpoint: path, size, modification time, sha256 prefix) and the code
it ran (env.json). Exit status: 0 when every metric is at most --tolerance AP below the reported
value, 1 when one falls short (or is missing), 2 for unusable input (no metrics file, no
evaluation results, unknown reference).
"""
import argparse
import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soco_d2.evaluation.reported_ap import (  # noqa: E402
    MetricsError,
    compare_to_reference,
    format_comparison,
    format_references,
    REFERENCE_TEST_SET,
    get_reference,
    read_eval_metrics,
    run_test_sets,
)
from soco_d2.utils.env import file_provenance  # noqa: E402


def describe_run_weights(output_dir: str) -> list:
    """Lines naming the weights a run started from and ended with, and its code's commit."""
    import json

    import yaml

    run_dir = output_dir if os.path.isdir(output_dir) else os.path.dirname(os.path.abspath(output_dir))
    lines = []
    config = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(config):
        with open(config) as f:
            weights = ((yaml.safe_load(f) or {}).get("MODEL") or {}).get("WEIGHTS", "")
        if weights:
            lines.append(f"pretrained weights (MODEL.WEIGHTS): {file_provenance(weights)}")
        else:
            lines.append("pretrained weights (MODEL.WEIGHTS): none (random initialisation)")
    last = os.path.join(run_dir, "last_checkpoint")
    if os.path.isfile(last):
        with open(last) as f:
            name = f.read().strip()
        lines.append(f"evaluated checkpoint: {file_provenance(os.path.join(run_dir, name))}")
    env_file = os.path.join(run_dir, "env.json")
    if os.path.isfile(env_file):
        with open(env_file) as f:
            pkg = json.load(f).get("soco_d2", {})
        commit = pkg.get("commit") or f"unknown ({pkg.get('reason', '?')})"
        lines.append(f"code: soco_d2 {pkg.get('version', '?')} at git {commit}"
                     f"{' (dirty)' if pkg.get('dirty') else ''}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("output_dir", nargs="?", help="run directory holding metrics.json (or the file itself)")
    p.add_argument("--reference", help="name of the reported result (see --list)")
    p.add_argument("--tolerance", type=float, default=0.3,
                   help="allowed shortfall in AP points (default 0.3, about the run-to-run variation "
                        "for COCO fine-tuning)")
    p.add_argument("--dataset", default=None, help="test set name when the run evaluated several")
    p.add_argument("--list", action="store_true", help="print the known references and exit")
    p.add_argument("--any-test-set", action="store_true",
                   help=f"compare even when the run was not evaluated on {REFERENCE_TEST_SET} "
                        "(the set of every reported number)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(format_references())
        return 0
    if not args.output_dir or not args.reference:
        parser.print_usage(sys.stderr)
        print("error: OUTPUT_DIR and --reference are required (or --list)", file=sys.stderr)
        return 2
    if args.tolerance < 0:
        print(f"error: --tolerance must be >= 0, got {args.tolerance}", file=sys.stderr)
        return 2
    try:
        get_reference(args.reference)
        measured, iteration = read_eval_metrics(args.output_dir, args.dataset)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    test_sets = run_test_sets(args.output_dir)
    if test_sets is not None and REFERENCE_TEST_SET not in test_sets and not args.any_test_set:
        print(f"error: {args.output_dir} was evaluated on {', '.join(test_sets) or 'no test set'} "
              f"(DATASETS.TEST in its config.yaml), but every reported number is COCO val2017 "
              f"({REFERENCE_TEST_SET}): the comparison would say nothing about the pretraining. "
              "Fine-tune and evaluate on COCO for a comparison (--any-test-set compares anyway).",
              file=sys.stderr)
        return 2
    comparison = compare_to_reference(measured, args.reference, args.tolerance)
    for line in describe_run_weights(args.output_dir):
        print(line)
    print(f"evaluation at iteration {iteration}")
    print(format_comparison(comparison))
    return 0 if comparison.passed else 1


if __name__ == "__main__":
    sys.exit(main())
