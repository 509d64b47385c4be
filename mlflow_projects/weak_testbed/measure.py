"""Single-image membership AUCs of a weak testbed built by train.py, with cdi's own extractor.

For each gray-box feature f (lower = member for every loss-type feature) prints the ROC AUC of
members vs nonmembers for the raw target feature -f_target and for the reference-calibrated
-(f_target - f_ref), ref = base (and reference_same_recipe if it exists). cdi's seeded noise
depends only on (seed, image sha256, feature, t, draw), so target and reference see the same noise.

    python measure.py --testbed /path/to/testbed [--json out.json]
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from cdi.data import discover_images
from cdi.features import GRAY_BOX_FEATURES, extract
from cdi.models import load_model


def auc(member, nonmember):
    """AUC of 'lower value = member'."""
    y = np.r_[np.ones(len(member)), np.zeros(len(nonmember))]
    return float(roc_auc_score(y, -np.r_[member, nonmember]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--testbed", required=True)
    p.add_argument("--features", default=",".join(GRAY_BOX_FEATURES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = args.features.split(",")
    members = discover_images(os.path.join(args.testbed, "members"), "suspect")
    nonmembers = discover_images(os.path.join(args.testbed, "nonmembers"), "control")
    records = members + nonmembers
    n = len(members)
    feats = {}
    for model in ("target", "base", "reference_same_recipe"):
        path = os.path.join(args.testbed, model)
        if not os.path.isdir(path):
            continue
        t0 = time.time()
        rep = extract(load_model(path), records, names, seed=args.seed, device="cpu", use_cache=False,
                      progress=False, threads=args.threads)
        feats[model] = rep.values
        print("%s: %d images x %d features in %.0fs" % (model, len(records), len(names), time.time() - t0),
              flush=True)
    result = {}
    refs = [m for m in feats if m != "target"]
    print("%-8s %7s %s" % ("feature", "raw", " ".join("%10s" % ("-" + r[:9]) for r in refs)))
    for j, name in enumerate(names):
        row = {"raw": auc(feats["target"][:n, j], feats["target"][n:, j])}
        for r in refs:
            d = feats["target"][:, j] - feats[r][:, j]
            row["minus_" + r] = auc(d[:n], d[n:])
        result[name] = row
        print("%-8s %7.3f %s" % (name, row["raw"], " ".join("%10.3f" % row["minus_" + r] for r in refs)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n_members": n, "n_nonmembers": len(nonmembers), "seed": args.seed, "auc": result}, f,
                      indent=1)


if __name__ == "__main__":
    main()
