#!/usr/bin/env python3
"""Quantization loss of the digits MLP and CNNs over several training runs.

One test split cannot tell quantizers apart: a digits test sample is 0.28 point. For
split/training seeds 0..N-1 this trains the networks of models/generate.py
(mlp_digits, cnn_digits, bn_pool_cnn_digits) on a stratified 75/25 split of digits,
compiles each with `veil compile` at the defaults (calibration: the first 1000 training
samples, as the shipped models), runs `veil predict --mode clear` on the calibration and
test sets, and prints per run and on average: float and clear test accuracy, the loss,
argmax agreement with float on calibration and test data, and the lookup bits chosen.
It also prints why calibration agreement overstates test agreement: the share of rows
whose float top-2 logit margin is small, on each set.

Run from the repository root after `cargo build -p veil-cli`:
    python3 scripts/accuracy_runs.py [--runs 10] [--models mlp,cnn,bn] [--keep DIR] [-- extra compile args]
Needs torch, scikit-learn, onnx and numpy (models/requirements.txt).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models"))
import generate as gen  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

VEIL = os.environ.get("VEIL", os.path.join("target", "debug", "veil"))
NETS = {
    "mlp": (lambda: gen.MLP([64, 32, 16, 10]), 60, False),
    "cnn": (gen.SmallCNN, 60, True),
    "bn": (gen.BnPoolCNN, 40, True),
}


def veil(*args):
    r = subprocess.run([VEIL, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"veil {' '.join(args)} failed:\n{r.stderr}")
    return r.stderr + r.stdout


def margin(logits):
    s = np.sort(logits, axis=1)
    return s[:, -1] - s[:, -2]


def one_run(kind, seed, tmp, extra):
    make, epochs, image = NETS[kind]
    gen.SEED = seed
    torch.manual_seed(seed)
    X, y = gen.digits()
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    if image:
        Xtr, Xte = Xtr.reshape(-1, 1, 8, 8), Xte.reshape(-1, 1, 8, 8)
    model = gen.train_torch(make(), Xtr, ytr, epochs)
    onx = gen.torch_export(model, torch.tensor(Xtr[:2]), 14)
    path = os.path.join(tmp, f"{kind}{seed}")
    import onnx
    onnx.save(onx, path + ".onnx")
    calib = Xtr[:gen.CALIB].astype(np.float32)
    np.save(path + "_calib.npy", calib)
    np.save(path + "_test.npy", Xte.astype(np.float32))
    out = veil("compile", path + ".onnx", "--calib", path + "_calib.npy", "-o", path + ".veil", *extra)
    bits = re.search(r"widest lookup (\d+) bits", out).group(1)
    res = {}
    for name, x in (("calib", calib), ("test", Xte.astype(np.float32))):
        with torch.no_grad():
            f = model(torch.tensor(x)).numpy()
        veil("predict", path + ".veil", "-i", path + f"_{name}.npy", "-o", path + f"_{name}_q.npy", "--mode", "clear")
        q = np.load(path + f"_{name}_q.npy")
        res[name] = (f, q)
    (fc, qc), (ft, qt) = res["calib"], res["test"]
    return {
        "float": (ft.argmax(1) == yte).mean(),
        "clear": (qt.argmax(1) == yte).mean(),
        "agree_calib": (qc.argmax(1) == fc.argmax(1)).mean(),
        "agree_test": (qt.argmax(1) == ft.argmax(1)).mean(),
        "small_calib": (margin(fc) < 1.0).mean(),
        "small_test": (margin(ft) < 1.0).mean(),
        "bits": int(bits),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--models", default="mlp,cnn,bn")
    ap.add_argument("--keep", help="keep models, data and artifacts in this directory")
    ap.add_argument("extra", nargs="*", help="extra `veil compile` arguments (after --)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = a.keep or scratch
        os.makedirs(tmp, exist_ok=True)
        for kind in a.models.split(","):
            rows = []
            for seed in range(a.runs):
                r = one_run(kind, seed, tmp, a.extra)
                rows.append(r)
                print(f"{kind} run {seed}: float {r['float']:.4f} clear {r['clear']:.4f} "
                      f"loss {100 * (r['float'] - r['clear']):+.2f} pt; agreement calib {r['agree_calib']:.4f} "
                      f"test {r['agree_test']:.4f}; margin<1 calib {r['small_calib']:.3f} test {r['small_test']:.3f}; "
                      f"{r['bits']} bits", flush=True)
            m = {k: np.mean([r[k] for r in rows]) for k in rows[0]}
            worst = max(r["float"] - r["clear"] for r in rows)
            print(f"{kind} mean of {a.runs}: float {m['float']:.4f} clear {m['clear']:.4f} "
                  f"loss {100 * (m['float'] - m['clear']):+.2f} pt (worst {100 * worst:+.2f}); agreement calib "
                  f"{m['agree_calib']:.4f} test {m['agree_test']:.4f}; margin<1 calib {m['small_calib']:.3f} "
                  f"test {m['small_test']:.3f}; bits {m['bits']:.1f}", flush=True)


if __name__ == "__main__":
    main()
