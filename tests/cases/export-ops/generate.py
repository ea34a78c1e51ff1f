"""Small models with the ops exporters write often (issue 9 #10), and onnxruntime's outputs.

Run from this folder: python3 generate.py. Writes layout.onnx (Tile, Split, Where with a
constant condition, ReduceMax/ReduceMin, MatMul: all runnable on ciphertexts), norms.onnx
(ReduceL1, ReduceSumSquare, ReduceL2), softmax11.onnx (opset-11 Softmax over axes 1.. of a
rank-3 tensor), calib.npy, test_x.npy and expected_<model>.npy.
"""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(7)


def const(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


def save(name, nodes, inits, out_shape, opset=13, in_shape=(6,)):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *out_shape])
    g = helper.make_graph(nodes, name, [x], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(m)
    onnx.save(m, f"{name}.onnx")
    return m


calib = rng.uniform(-1, 1, (200, 6)).astype(np.float32)
test = rng.uniform(-1, 1, (60, 6)).astype(np.float32)
np.save("calib.npy", calib)
np.save("test_x.npy", test)

# layout: t = tile(x, [1, 2]) [N, 12]; w = where(mask, t, -t); a, b = split(w, [5, 7]);
# y = concat(a @ W, max(b), min(b)) [N, 5]
mask = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0], dtype=bool)
W = rng.normal(0, 0.5, (5, 3)).astype(np.float32)
save(
    "layout",
    [
        helper.make_node("Tile", ["x", "reps"], ["t"]),
        helper.make_node("Neg", ["t"], ["nt"]),
        helper.make_node("Where", ["mask", "t", "nt"], ["w"]),
        helper.make_node("Split", ["w", "sizes"], ["a", "b"], axis=1),
        helper.make_node("MatMul", ["a", "W"], ["aw"]),
        helper.make_node("ReduceMax", ["b"], ["bmax"], axes=[1], keepdims=1),
        helper.make_node("ReduceMin", ["b"], ["bmin"], axes=[1], keepdims=1),
        helper.make_node("Concat", ["aw", "bmax", "bmin"], ["y"], axis=1),
    ],
    [const("reps", np.array([1, 2], np.int64)), const("mask", mask), const("sizes", np.array([5, 7], np.int64)),
     const("W", W)],
    (5,),
)

# norms: y = concat(l1(x), sumsquare(x), l2(x)) over features [N, 3]
save(
    "norms",
    [
        helper.make_node("ReduceL1", ["x"], ["l1"], axes=[1], keepdims=1),
        helper.make_node("ReduceSumSquare", ["x"], ["ss"], axes=[1], keepdims=1),
        helper.make_node("ReduceL2", ["x"], ["l2"], axes=[1], keepdims=1),
        helper.make_node("Concat", ["l1", "ss", "l2"], ["y"], axis=1),
    ],
    [],
    (3,),
)

# softmax11: x reshaped to [N, 2, 3]; opset 11 softmax(axis=1) normalises over all 6.
save(
    "softmax11",
    [
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Softmax", ["r"], ["y"], axis=1),
    ],
    [const("shape", np.array([-1, 2, 3], np.int64))],
    (2, 3),
    opset=11,
)

for name in ["layout", "norms", "softmax11"]:
    s = ort.InferenceSession(f"{name}.onnx", providers=["CPUExecutionProvider"])
    np.save(f"expected_{name}.npy", s.run(None, {"x": test})[0])
