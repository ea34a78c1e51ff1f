#!/usr/bin/env python3
"""Train and export the tree-ensemble models (random forests, extra trees, gradient boosting,
XGBoost, LightGBM) that veil's tree support is tested and benchmarked on.

Run from the repository root:  python3 models/generate_trees.py
Needs what models/generate.py needs, plus xgboost, lightgbm and onnxmltools for the
xgb_*/lgbm_* models (skipped with a notice when those are not installed).

Each model goes to models/trees/<name>/ in exactly generate.py's folder format (model.onnx,
calib.npy, test_x.npy, test_y.npy, ort/<output>.npy, meta.json), written by generate.save();
meta.json additionally gets a "trees" entry with the ensemble's shape (see tree_stats()).
The script asserts that onnxruntime reproduces the framework's predictions (labels, and
probabilities within 1e-4, for classifiers; values within 1e-4 for regressors) and prints a table
of the ensembles' shapes ("ort-diff" is the largest difference in values or probabilities).
"""

import json
import os
import sys
from collections import defaultdict

import numpy as np
import onnx

from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
from sklearn.ensemble import (ExtraTreesClassifier, ExtraTreesRegressor,
                              GradientBoostingClassifier, GradientBoostingRegressor,
                              RandomForestClassifier, RandomForestRegressor)
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import torch  # noqa: F401  generate.py imports it at module level; no tree model needs it
    import generate as g
except ImportError:
    # Let `import generate` succeed without PyTorch: a stand-in whose every attribute is `object`
    # is enough for generate.py's module-level class definitions, which this script never uses.
    # It is removed again at once, so that scipy & co. do not mistake it for the real torch.
    import types
    _torch, _nn = types.ModuleType("torch"), types.ModuleType("torch.nn")
    _nn.__getattr__ = lambda attr: object
    _torch.nn = _nn
    sys.modules.update({"torch": _torch, "torch.nn": _nn})
    try:
        import generate as g  # reuses save, split, sk_export, ROOT, SEED
    finally:
        del sys.modules["torch"], sys.modules["torch.nn"]

OPSET = 17          # ai.onnx; ai.onnx.ml 3 (generate.sk_export picks it for opset >= 16)
MLTOOLS_OPSET = 15  # the highest ai.onnx opset onnxmltools 1.16's converters accept
REG_ATOL = 1e-4     # onnxruntime vs framework, regressors


# ---------------------------------------------------------------- ensemble shape

def tree_nodes(onnx_model):
    """The TreeEnsemble* nodes of a model."""
    return [n for n in onnx_model.graph.node
            if n.domain == "ai.onnx.ml" and n.op_type in ("TreeEnsembleRegressor", "TreeEnsembleClassifier")]


def attr_value(a):
    if a.type == onnx.AttributeProto.TENSOR:
        return onnx.numpy_helper.to_array(a.t).tolist()
    return onnx.helper.get_attribute_value(a)


def tree_stats(onnx_model):
    """Shape of the ensemble(s): trees, depth (branch nodes on the longest root-to-leaf path),
    internal nodes, distinct (feature, threshold) pairs, most distinct thresholds of one feature,
    and which attribute forms / modes / post_transform the exporter wrote."""
    trees = depth = internal = 0
    pairs = set()
    forms, modes, post = set(), set(), set()
    for node in tree_nodes(onnx_model):
        at = {a.name: a for a in node.attribute}
        forms |= {k for k in at if k.startswith(("nodes_values", "target_weights", "class_weights", "base_values"))}
        post.add(attr_value(at["post_transform"]).decode() if "post_transform" in at else "NONE")
        vals = attr_value(at["nodes_values"] if "nodes_values" in at else at["nodes_values_as_tensor"])
        tids, nids = attr_value(at["nodes_treeids"]), attr_value(at["nodes_nodeids"])
        feats, mode = attr_value(at["nodes_featureids"]), [m.decode() for m in attr_value(at["nodes_modes"])]
        t_ids, f_ids = attr_value(at["nodes_truenodeids"]), attr_value(at["nodes_falsenodeids"])
        modes |= set(mode)
        kids = {}
        for i, t in enumerate(tids):
            if mode[i] != "LEAF":
                internal += 1
                pairs.add((feats[i], np.float32(vals[i]).item()))
                kids[(t, nids[i])] = (t_ids[i], f_ids[i])
        for t in sorted(set(tids)):
            trees += 1
            # root: a node of tree t that is nobody's child
            children = {c for (tt, _), cs in kids.items() if tt == t for c in cs}
            root = min(n for tt, n in zip(tids, nids) if tt == t and n not in children)

            def d(n):
                return 0 if (t, n) not in kids else 1 + max(d(c) for c in kids[(t, n)])
            depth = max(depth, d(root))
    per_feature = defaultdict(set)
    for f, v in pairs:
        per_feature[f].add(v)
    return {
        "trees": trees,
        "max_depth": depth,
        "internal_nodes": internal,
        "distinct_feature_thresholds": len(pairs),
        "max_thresholds_per_feature": max((len(s) for s in per_feature.values()), default=0),
        "features_used": len(per_feature),
        "attributes": sorted(forms),
        "nodes_modes": sorted(modes),
        "post_transform": sorted(post),
    }


# ---------------------------------------------------------------- export, save, check

ROWS = []


def tree_model(name, model, X, y, task, export, how, split=None):
    """Fit `model`, export it with `export(model, Xtr)`, write models/trees/<name>/ with generate.save,
    assert onnxruntime reproduces the framework's predictions, record the ensemble's shape."""
    X = X.astype(np.float32)
    y = y.astype(np.int64 if task == "classification" else np.float32)
    Xtr, Xte, ytr, yte = split(X, y) if split else g.split(X, y)
    model.fit(Xtr, ytr)
    onx = export(model, Xtr)
    # Exporters list opset imports in set order (varies with PYTHONHASHSEED) and some name the
    # graph with a random uuid: fix both so that reruns write identical files.
    ops = sorted((o.domain, o.version) for o in onx.opset_import)
    del onx.opset_import[:]
    onx.opset_import.extend(onnx.helper.make_opsetid(dom, ver) for dom, ver in ops)
    onx.graph.name = f"ONNX({type(model).__name__})"
    metric = (lambda x, t: float(accuracy_score(t, model.predict(x)))) if task == "classification" else \
        (lambda x, t: float(r2_score(t, model.predict(x))))
    rel = f"trees/{name}"
    g.save(rel, onx, Xtr, Xte, yte, task, how, metric)

    d = os.path.join(g.ROOT, rel)
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    first = np.load(os.path.join(d, meta["output_files"][meta["outputs"][0]]))
    test_x = np.load(os.path.join(d, "test_x.npy"))
    ref = model.predict(test_x)
    if task == "classification":
        bad = int((first.reshape(-1) != ref.reshape(-1)).sum())
        assert bad == 0, f"{name}: onnxruntime's labels differ from the framework's on {bad} samples"
        probs = np.load(os.path.join(d, meta["output_files"][meta["outputs"][1]]))
        diff = float(np.abs(probs.astype(np.float64) - model.predict_proba(test_x)).max())
        assert diff <= 1e-4, f"{name}: onnxruntime's probabilities differ from the framework's by {diff}"
    else:
        diff = float(np.abs(first.reshape(-1).astype(np.float64) - ref.reshape(-1)).max())
        assert diff <= REG_ATOL, f"{name}: onnxruntime differs from the framework by {diff}"
    stats = tree_stats(onx)
    meta["trees"] = {k: v for k, v in stats.items()}
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    ROWS.append((name, meta["metric"], meta["float_metric"], diff, stats, os.path.getsize(os.path.join(d, "model.onnx"))))


def sk_export(model, Xtr):
    return g.sk_export(model, Xtr, OPSET)


def sk_how(model):
    return f"scikit-learn {type(model).__name__}({model.n_estimators} trees, max_depth {model.max_depth}) via skl2onnx, opset {OPSET}"


def sk(name, model, X, y, task, split=None):
    tree_model(name, model, X, y, task, sk_export, sk_how(model), split)


def onnxmltools_export(kind):
    def export(model, Xtr):
        import onnxmltools
        from onnxmltools.convert.common.data_types import FloatTensorType
        types = [("input", FloatTensorType([None, Xtr.shape[1]]))]
        if kind == "xgboost":
            return onnxmltools.convert_xgboost(model, initial_types=types, target_opset=MLTOOLS_OPSET)
        return onnxmltools.convert_lightgbm(model, initial_types=types, target_opset=MLTOOLS_OPSET, zipmap=False)
    return export


def split_42_20(X, y):
    """The split Concrete ML's random-forest regression benchmark style uses (test 20 %, random_state 42):
    diabetes' seed-0 split is an unusually hard one (R² ≈ 0.25 for the 10x4 forest, ≈ 0.43 here)."""
    return train_test_split(X, y, test_size=0.2, random_state=42)


def main():
    np.random.seed(g.SEED)
    S = g.SEED
    d_X, d_y = load_diabetes(return_X_y=True)
    bc_X, bc_y = load_breast_cancer(return_X_y=True)
    w_X, w_y = load_wine(return_X_y=True)

    sk("rf_diabetes_10x4", RandomForestRegressor(n_estimators=10, max_depth=4, random_state=S), d_X, d_y, "regression",
       split=split_42_20)
    sk("rf_breast_cancer_50x5", RandomForestClassifier(n_estimators=50, max_depth=5, random_state=S), bc_X, bc_y,
       "classification")
    sk("extra_trees_wine", ExtraTreesClassifier(n_estimators=10, max_depth=4, random_state=S), w_X, w_y, "classification")
    sk("extra_trees_diabetes", ExtraTreesRegressor(n_estimators=10, max_depth=4, random_state=S), d_X, d_y, "regression",
       split=split_42_20)
    sk("gboost_breast_cancer", GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=S), bc_X, bc_y,
       "classification")
    sk("gboost_wine", GradientBoostingClassifier(n_estimators=10, max_depth=3, random_state=S), w_X, w_y, "classification")
    # small enough to run encrypted in the tests (3 classes: one leaf lookup per class)
    sk("rf_wine_3x3", RandomForestClassifier(n_estimators=3, max_depth=3, random_state=S), w_X, w_y, "classification")
    sk("gboost_diabetes", GradientBoostingRegressor(n_estimators=20, max_depth=3, random_state=S), d_X, d_y, "regression",
       split=split_42_20)

    try:
        import lightgbm
        import onnxmltools
        import xgboost
    except ImportError as e:
        print(f"skipping xgb_*/lgbm_* models: {e}")
    else:
        xgb = xgboost.XGBClassifier(n_estimators=20, max_depth=3, learning_rate=0.3, random_state=S, n_jobs=1)
        tree_model("xgb_breast_cancer", xgb, bc_X, bc_y, "classification", onnxmltools_export("xgboost"),
                   f"XGBoost {xgboost.__version__} XGBClassifier(20 trees, max_depth 3) via onnxmltools "
                   f"{onnxmltools.__version__}, opset {MLTOOLS_OPSET}")
        lgbm = lightgbm.LGBMRegressor(n_estimators=20, num_leaves=15, random_state=S, n_jobs=1, verbose=-1)
        tree_model("lgbm_diabetes", lgbm, d_X, d_y, "regression", onnxmltools_export("lightgbm"),
                   f"LightGBM {lightgbm.__version__} LGBMRegressor(20 trees, num_leaves 15) via onnxmltools "
                   f"{onnxmltools.__version__}, opset {MLTOOLS_OPSET}", split=split_42_20)

    print()
    print(f"{'name':24s} {'metric':>12s} {'ort-diff':>8s} {'trees':>5s} {'depth':>5s} {'internal':>8s} "
          f"{'(f,thr)':>7s} {'thr/feat':>8s} {'feats':>5s} {'bytes':>7s}  post_transform / attributes / modes")
    for name, m, score, diff, s, size in ROWS:
        print(f"{name:24s} {m:>4s}={score:7.4f} {diff:8.1e} {s['trees']:5d} {s['max_depth']:5d} {s['internal_nodes']:8d} "
              f"{s['distinct_feature_thresholds']:7d} {s['max_thresholds_per_feature']:8d} {s['features_used']:5d} "
              f"{size:7d}  {','.join(s['post_transform'])} / {','.join(s['attributes'])} / {','.join(s['nodes_modes'])}")


if __name__ == "__main__":
    sys.exit(main())
