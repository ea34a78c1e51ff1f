#!/usr/bin/env python3
"""Datasets for veil's encrypted training examples, tests and benchmarks.

For each dataset this writes models/<name>/:
  train_x.npy, train_y.npy   float32 features in [-1, 1] (MinMax fitted on the training
                             split), int64 class labels
  test_x.npy, test_y.npy     the stratified test split, scaled the same way and clipped to
                             [-1, 1]
  meta.json                  float references on the same split: scikit-learn's
                             SGDClassifier (log loss, learning rate 1, one sample per
                             step), float mini-batch SGD as veil's step computes it (batch 8,
                             learning rate 1, zero start, batches in file order, the last one
                             completed from the first samples, one-vs-rest for 3+ classes),
                             and LogisticRegression (the converged optimum)

Each folder also holds export_check/: a model veil trained and exported (veil_export.onnx,
weights.npy, bias.npy, from `veil train --mode clear --epochs 1 -o
models/<name>/export_check/veil_export.onnx --weights-dir models/<name>/export_check`) and
onnxruntime's outputs on test_x (ort_label.npy, ort_probabilities.npy): a test checks that
veil reads its own ONNX export as onnxruntime does.

Run from the repository root:  python models/generate_training.py
Needs: scikit-learn, numpy (and onnxruntime for export_check). veil itself never runs
Python.
"""

import json
import os
import sys
import warnings

import numpy as np
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import MinMaxScaler

ROOT = os.path.dirname(os.path.abspath(__file__))
SEED = 0
EPOCHS = 5


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def minibatch_sgd(x, y, xt, yt, classes, batch=8, lr=1.0, epochs=EPOCHS):
    """Float SGD exactly as veil's step: test accuracy after each epoch."""
    scores = 1 if len(classes) == 2 else len(classes)
    idx = np.searchsorted(classes, y)
    t = (idx == 1).astype(float)[:, None] if scores == 1 else np.eye(scores)[idx]
    w = np.zeros((x.shape[1], scores))
    b = np.zeros(scores)
    steps = -(-len(x) // batch)
    out = []
    for _ in range(epochs):
        for s in range(steps):
            rows = [(s * batch + i) % len(x) for i in range(batch)]
            e = sigmoid(x[rows] @ w + b) - t[rows]
            w -= lr * x[rows].T @ e / batch
            b -= lr * e.sum(0) / batch
        z = xt @ w + b
        pred = classes[(z[:, 0] > 0).astype(int)] if scores == 1 else classes[z.argmax(1)]
        out.append(float((pred == yt).mean()))
    return out


def sklearn_sgd(x, y, xt, yt, epochs=EPOCHS):
    out = []
    for e in range(1, epochs + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            m = SGDClassifier(loss="log_loss", penalty=None, learning_rate="constant", eta0=1.0, max_iter=e,
                              tol=None, shuffle=False, random_state=SEED).fit(x, y)
        out.append(float(m.score(xt, yt)))
    return out


def dataset(name, X, y, source):
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=SEED, stratify=y)
    sc = MinMaxScaler(feature_range=(-1, 1)).fit(Xtr)
    xtr = np.clip(sc.transform(Xtr), -1, 1).astype(np.float32)
    xte = np.clip(sc.transform(Xte), -1, 1).astype(np.float32)
    ytr = ytr.astype(np.int64)
    yte = yte.astype(np.int64)
    d = os.path.join(ROOT, name)
    os.makedirs(d, exist_ok=True)
    for f, a in [("train_x", xtr), ("train_y", ytr), ("test_x", xte), ("test_y", yte)]:
        np.save(os.path.join(d, f + ".npy"), a)
    classes = np.unique(ytr)
    x64, xt64 = xtr.astype(np.float64), xte.astype(np.float64)
    meta = {
        "task": "training",
        "source": source,
        "scaling": "MinMaxScaler(feature_range=(-1, 1)) fitted on the training split; test clipped to [-1, 1]",
        "split": f"train_test_split(test_size=0.25, random_state={SEED}, stratify=y)",
        "features": int(xtr.shape[1]),
        "classes": [int(c) for c in classes],
        "train_samples": int(len(xtr)),
        "test_samples": int(len(xte)),
        "float_minibatch_sgd_test_accuracy": minibatch_sgd(x64, ytr, xt64, yte, classes),
        "float_minibatch_sgd": "batch 8, learning rate 1, zero start, file order, one-vs-rest for 3+ classes",
        "sklearn_sgd_test_accuracy": sklearn_sgd(xtr, ytr, xte, yte),
        "sklearn_sgd": "SGDClassifier(loss='log_loss', penalty=None, learning_rate='constant', eta0=1, shuffle=False), one sample per step",
        "logistic_regression_test_accuracy": float(LogisticRegression(max_iter=1000).fit(xtr, ytr).score(xte, yte)),
        "accuracy_per": "epoch (entry k: after k+1 epochs)",
    }
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    print(f"{name}: {meta['train_samples']} train / {meta['test_samples']} test, float mini-batch SGD "
          f"{meta['float_minibatch_sgd_test_accuracy'][:2]}, sklearn SGD {meta['sklearn_sgd_test_accuracy'][:2]}, "
          f"LogisticRegression {meta['logistic_regression_test_accuracy']:.4f}")


def export_check(name):
    """onnxruntime's outputs for the model veil exported into models/<name>/export_check."""
    d = os.path.join(ROOT, name, "export_check")
    if not os.path.exists(os.path.join(d, "veil_export.onnx")):
        print(f"{name}: no export_check/veil_export.onnx (make it with veil train, see above)")
        return
    import onnxruntime as ort
    sess = ort.InferenceSession(os.path.join(d, "veil_export.onnx"), providers=["CPUExecutionProvider"])
    x = np.load(os.path.join(ROOT, name, "test_x.npy"))
    label, prob = sess.run(["label", "probabilities"], {"X": x})
    np.save(os.path.join(d, "ort_label.npy"), label.astype(np.int64))
    np.save(os.path.join(d, "ort_probabilities.npy"), prob.astype(np.float32))
    y = np.load(os.path.join(ROOT, name, "test_y.npy"))
    print(f"{name}: onnxruntime runs veil's export, test accuracy {float((label == y).mean()):.4f}")


def main():
    X, y = load_breast_cancer(return_X_y=True)
    dataset("train_breast_cancer", X, y, "sklearn.datasets.load_breast_cancer (binary, 30 features)")
    X, y = load_wine(return_X_y=True)
    dataset("train_wine", X, y, "sklearn.datasets.load_wine (3 classes, 13 features)")
    for name in ("train_breast_cancer", "train_wine"):
        export_check(name)


if __name__ == "__main__":
    sys.exit(main())
