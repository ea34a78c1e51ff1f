#!/usr/bin/env python3
"""Encrypted training against float SGD over 20 stratified splits of breast cancer.

For test sizes 0.25 and 0.2 and split seeds 0–9: MinMax-scale to [-1, 1] on the training
part, run float mini-batch SGD as veil's step computes it (models/generate_training.py)
and `veil train --mode simulate --epochs 2` with dither seeds 0–2, and print test
accuracy after each epoch, then the means per test size. Extra arguments go to
`veil train` (e.g. --weight-range 2).

Run from the repository root after `cargo build -p veil-cli`:
    python3 scripts/training_splits.py
Needs scikit-learn and numpy; writes the splits under a temporary directory.
"""

import os
import re
import subprocess
import sys
import tempfile

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import MinMaxScaler

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models"))
from generate_training import minibatch_sgd  # noqa: E402

VEIL = os.environ.get("VEIL", os.path.join("target", "debug", "veil"))
PATTERN = re.compile(r"test accuracy after each epoch: ([0-9.]+) \(float SGD [0-9.]+\), ([0-9.]+)")


def main():
    X, y = load_breast_cancer(return_X_y=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for test_size in (0.25, 0.2):
            for seed in range(10):
                Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
                sc = MinMaxScaler(feature_range=(-1, 1)).fit(Xtr)
                xtr = np.clip(sc.transform(Xtr), -1, 1).astype(np.float32)
                xte = np.clip(sc.transform(Xte), -1, 1).astype(np.float32)
                files = {"tx": xtr, "ty": ytr.astype(np.int64), "vx": xte, "vy": yte.astype(np.int64)}
                for name, a in files.items():
                    np.save(os.path.join(tmp, name + ".npy"), a)
                flt = minibatch_sgd(xtr.astype(float), ytr, xte.astype(float), yte, np.unique(ytr), epochs=2)
                runs = []
                for dither in range(3):
                    args = [VEIL, "train", "--mode", "simulate", "--epochs", "2", "--seed", str(dither),
                            "--data", os.path.join(tmp, "tx.npy"), "--labels", os.path.join(tmp, "ty.npy"),
                            "--test-data", os.path.join(tmp, "vx.npy"), "--test-labels", os.path.join(tmp, "vy.npy"),
                            "-o", os.path.join(tmp, "m.onnx")] + sys.argv[1:]
                    out = subprocess.run(args, capture_output=True, text=True, check=True).stderr
                    m = PATTERN.search(out)
                    runs.append((float(m.group(1)), float(m.group(2))))
                veil = np.mean(runs, axis=0)
                rows.append((test_size, flt[0], flt[1], veil[0], veil[1]))
                print(f"test {test_size} split {seed}: float SGD {flt[0]:.3f} {flt[1]:.3f}, veil {veil[0]:.3f} {veil[1]:.3f}",
                      flush=True)
    r = np.array(rows)
    for test_size in (0.25, 0.2):
        q = r[r[:, 0] == test_size][:, 1:].mean(axis=0)
        print(f"test {test_size} mean: float SGD {q[0]:.4f} {q[1]:.4f}, veil {q[2]:.4f} {q[3]:.4f}")


if __name__ == "__main__":
    main()
