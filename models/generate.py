#!/usr/bin/env python3
"""Train and export the small models veil's tests, examples and benchmarks use.

For every model this writes a folder models/<name>/ holding
  model.onnx        the exported model (symbolic batch dimension on every input)
  calib.npy         float32 calibration inputs (from the training split)
  test_x.npy        float32 test inputs
  test_y.npy        test labels (int64) or targets (float32)
  ort/<output>.npy  onnxruntime's outputs on test_x, one file per model output
  meta.json         task, output names, opsets, float accuracy, how it was made

Run from the repository root:  python models/generate.py
Needs: torch, scikit-learn, skl2onnx, onnxruntime, onnx (see models/requirements.txt).
veil itself never runs Python; the generated files are committed.
"""

import json
import os
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_iris, load_wine, make_classification
from sklearn.ensemble import (GradientBoostingClassifier, GradientBoostingRegressor,
                              RandomForestClassifier, RandomForestRegressor)
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from skl2onnx import to_onnx

ROOT = os.path.dirname(os.path.abspath(__file__))
CALIB = 1000     # calibration samples kept per model (from the training split)
TEST = 360       # test samples kept per model (at most)
SEED = 0


def out_dir(name):
    d = os.path.join(ROOT, name)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(os.path.join(d, "ort"))
    return d


def safe(name):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def save(name, onnx_model, calib, test_x, test_y, task, how, predict_float):
    """Write one model folder and check onnxruntime reproduces the framework's predictions."""
    d = out_dir(name)
    onnx.save(onnx_model, os.path.join(d, "model.onnx"))
    calib = calib[:CALIB].astype(np.float32)
    test_x = test_x[:TEST].astype(np.float32)
    test_y = test_y[:TEST]
    np.save(os.path.join(d, "calib.npy"), calib)
    np.save(os.path.join(d, "test_x.npy"), test_x)
    np.save(os.path.join(d, "test_y.npy"), test_y.astype(np.int64 if task == "classification" else np.float32))
    sess = ort.InferenceSession(os.path.join(d, "model.onnx"), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: test_x})
    names = [o.name for o in sess.get_outputs()]
    files = {}
    for n, v in zip(names, outs):
        files[n] = f"ort/{safe(n)}.npy"
        np.save(os.path.join(d, files[n]), np.asarray(v))
    score = predict_float(test_x, test_y)
    meta = {
        "task": task,
        "outputs": names,
        "output_files": files,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in onnx_model.opset_import},
        "float_metric": score,
        "metric": "accuracy" if task == "classification" else "r2",
        "made_by": how,
        "test_samples": int(len(test_x)),
    }
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    print(f"{name:28s} {meta['metric']}={score:.4f}  outputs={names}  opsets={meta['opsets']}")


def split(X, y, test_size=0.25):
    return train_test_split(X, y, test_size=test_size, random_state=SEED, stratify=y if y.dtype.kind == "i" else None)


# ---------------------------------------------------------------- scikit-learn models

def sk_export(model, X, opset):
    return to_onnx(model, X[:1].astype(np.float32), options={"zipmap": False} if hasattr(model, "predict_proba") else None,
                   target_opset={"": opset, "ai.onnx.ml": 3 if opset >= 16 else 1})


def sk_classifier(name, model, X, y, opset=17):
    Xtr, Xte, ytr, yte = split(X.astype(np.float32), y)
    model.fit(Xtr, ytr)
    onx = sk_export(model, Xtr, opset)
    save(name, onx, Xtr, Xte, yte, "classification", f"scikit-learn {type(model).__name__} via skl2onnx, opset {opset}",
         lambda x, t: float(accuracy_score(t, model.predict(x))))


def sk_regressor(name, model, X, y, opset=17):
    Xtr, Xte, ytr, yte = split(X.astype(np.float32), y.astype(np.float32))
    model.fit(Xtr, ytr)
    onx = sk_export(model, Xtr, opset)
    save(name, onx, Xtr, Xte, yte, "regression", f"scikit-learn {type(model).__name__} via skl2onnx, opset {opset}",
         lambda x, t: float(r2_score(t, model.predict(x))))


# ---------------------------------------------------------------- PyTorch models

def train_torch(model, Xtr, ytr, epochs, lr=0.01, classification=True):
    torch.manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss() if classification else nn.MSELoss()
    X = torch.tensor(Xtr)
    Y = torch.tensor(ytr)
    for _ in range(epochs):
        perm = torch.randperm(len(X))
        for i in range(0, len(X), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            out = model(X[idx])
            loss = loss_fn(out, Y[idx]) if classification else loss_fn(out.squeeze(-1), Y[idx])
            loss.backward()
            opt.step()
    model.eval()
    return model


def torch_export(model, example, opset, dynamo=False):
    path = os.path.join(ROOT, "_tmp.onnx")
    if dynamo:
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(model, (example,), path, input_names=["input"], output_names=["output"],
                          dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False)
    else:
        torch.onnx.export(model, (example,), path, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    m = onnx.load(path)  # loads any external weight file too; save() embeds it
    for leftover in (path, path + ".data"):
        if os.path.exists(leftover):
            os.remove(leftover)
    return m


def torch_classifier(name, model, Xtr, Xte, ytr, yte, epochs, opset=14, dynamo=False, lr=0.01):
    torch.manual_seed(SEED)
    train_torch(model, Xtr, ytr, epochs, lr=lr)
    onx = torch_export(model, torch.tensor(Xtr[:2]), opset, dynamo)

    def acc(x, t):
        with torch.no_grad():
            return float((model(torch.tensor(x)).argmax(-1).numpy() == t).mean())

    how = f"PyTorch {torch.__version__}, torch.onnx.export(dynamo={dynamo}), opset {opset}"
    save(name, onx, Xtr, Xte, yte, "classification", how, acc)


class MLP(nn.Module):
    def __init__(self, sizes, act=nn.ReLU):
        super().__init__()
        layers = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(act())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """conv 3x3 (1→4) → ReLU → MaxPool 2 → flatten → Gemm (36→10), on 8×8 digits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv(x)))
        return self.fc(x.reshape(x.shape[0], -1))


class BnPoolCNN(nn.Module):
    """conv (padded) → ReLU → BatchNorm → AveragePool → flatten → Gemm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(self.bn(torch.relu(self.conv(x))))
        return self.fc(torch.flatten(x, 1))


class GeluNet(nn.Module):
    """Linear → GELU → Linear → Tanh → Linear → Sigmoid (2 classes as [1-p, p] logits)."""

    def __init__(self, n_in):
        super().__init__()
        self.l1 = nn.Linear(n_in, 16)
        self.l2 = nn.Linear(16, 16)
        self.l3 = nn.Linear(16, 2)

    def forward(self, x):
        return torch.sigmoid(self.l3(torch.tanh(self.l2(nn.functional.gelu(self.l1(x))))))


class Sigmoid16(nn.Module):
    """16 sigmoids between two linear maps, so they must run on encrypted data (a trailing
    sigmoid would move to the client): the cost of 16 table lookups, nothing else."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(16, 16)
        self.l2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.l2(torch.sigmoid(self.l1(x)))


def digits():
    X, y = load_digits(return_X_y=True)
    return (X / 16.0).astype(np.float32), y.astype(np.int64)


def main():
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)

    # Required models (issue 2).
    bc_X, bc_y = load_breast_cancer(return_X_y=True)
    sk_classifier("logreg_breast_cancer", make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)), bc_X, bc_y)
    d_X, d_y = load_diabetes(return_X_y=True)
    sk_regressor("linreg_diabetes", LinearRegression(), d_X, d_y)

    X, y = digits()
    Xtr, Xte, ytr, yte = split(X, y)
    torch_classifier("mlp_digits", MLP([64, 32, 16, 10]), Xtr, Xte, ytr, yte, epochs=60)
    img = lambda a: a.reshape(-1, 1, 8, 8)
    torch_classifier("cnn_digits", SmallCNN(), img(Xtr), img(Xte), ytr, yte, epochs=60)
    torch_classifier("bn_pool_cnn_digits", BnPoolCNN(), img(Xtr), img(Xte), ytr, yte, epochs=40)

    sc = StandardScaler().fit(bc_X)
    bXtr, bXte, bytr, byte = split(sc.transform(bc_X).astype(np.float32), bc_y)
    torch_classifier("gelu_tanh_sigmoid_breast_cancer", GeluNet(30), bXtr, bXte, bytr, byte, epochs=40, lr=0.005)

    # 16 sigmoids between two linear maps (a cost benchmark), on a synthetic 4-class task
    # with 16 informative features.
    sX, sy = make_classification(n_samples=800, n_features=16, n_informative=10, n_classes=4, class_sep=2.0,
                                 random_state=SEED)
    sXtr, sXte, sytr, syte = split(sX.astype(np.float32), sy.astype(np.int64))
    torch_classifier("sigmoid16", Sigmoid16(), sXtr, sXte, sytr, syte, epochs=40)

    # Other exporters and opsets with a symbolic batch dimension: the importer must not
    # depend on the committed models' quirks.
    for opset in (13, 15, 17):
        torch_classifier(f"extra/mlp_digits_torch_opset{opset}", MLP([64, 24, 10], act=nn.GELU), Xtr, Xte, ytr, yte,
                         epochs=20, opset=opset)
    torch_classifier("extra/mlp_digits_torch_dynamo_opset18", MLP([64, 24, 10], act=nn.Tanh), Xtr, Xte, ytr, yte,
                     epochs=20, opset=18, dynamo=True)
    iris_X, iris_y = load_iris(return_X_y=True)
    wine_X, wine_y = load_wine(return_X_y=True)
    sk_classifier("extra/logreg_ovr_iris_opset13", LogisticRegression(max_iter=1000), iris_X, iris_y, opset=13)
    sk_classifier("extra/mlp_wine_skl_opset15", make_pipeline(StandardScaler(), MLPClassifier((16,), max_iter=2000, random_state=SEED)),
                  wine_X, wine_y, opset=15)
    sk_regressor("extra/ridge_diabetes_opset15", make_pipeline(MinMaxScaler(), Ridge(alpha=0.1)), d_X, d_y, opset=15)
    sk_classifier("extra/forest_breast_cancer_opset17", RandomForestClassifier(n_estimators=8, max_depth=4, random_state=SEED),
                  bc_X, bc_y, opset=17)
    sk_classifier("extra/forest_wine_opset13", RandomForestClassifier(n_estimators=6, max_depth=3, random_state=SEED),
                  wine_X, wine_y, opset=13)
    sk_classifier("extra/gboost_breast_cancer_opset15", GradientBoostingClassifier(n_estimators=10, max_depth=2, random_state=SEED),
                  bc_X, bc_y, opset=15)
    sk_classifier("extra/gboost_iris_opset17", GradientBoostingClassifier(n_estimators=8, max_depth=2, random_state=SEED),
                  iris_X, iris_y, opset=17)
    sk_regressor("extra/forest_diabetes_opset17", RandomForestRegressor(n_estimators=8, max_depth=4, random_state=SEED), d_X, d_y)
    sk_regressor("extra/gboost_diabetes_opset13", GradientBoostingRegressor(n_estimators=10, max_depth=2, random_state=SEED),
                 d_X, d_y, opset=13)


if __name__ == "__main__":
    sys.exit(main())
