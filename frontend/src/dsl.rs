//! A Rust builder for veil graphs: the same IR the ONNX importer produces, written in code.
//!
//! Every call checks shapes at once and returns an error naming the op, so a mistake
//! shows where it was made rather than at compile time.
//!
//! ```
//! use ndarray::{Array1, Array2};
//! use veil_frontend::dsl::GraphBuilder;
//!
//! # fn main() -> veil_frontend::Result<()> {
//! let mut b = GraphBuilder::new("two_layer");
//! let x = b.input("x", &[4]); // [N, 4]
//! let h = b.linear(x, Array2::from_elem((8, 4), 0.1), Some(Array1::zeros(8)))?;
//! let h = b.relu(h)?;
//! let y = b.linear(h, Array2::from_elem((3, 8), 0.2), None)?;
//! let p = b.softmax(y, 1)?;
//! b.output("probabilities", p);
//! let graph = b.finish()?;
//!
//! let out = veil_ir::interp::run(&graph, &[veil_ir::Tensor::F32(ndarray::ArrayD::ones(vec![2, 4]))])?;
//! assert_eq!(out[0].shape(), &[2, 3]);
//! # Ok(())
//! # }
//! ```

use crate::error::Result;
use ndarray::{Array1, Array2, Array4, ArrayD};
use veil_ir::op::{Conv2d, Pool2d, ReduceKind, UnaryFn};
use veil_ir::{BinaryFn, Graph, NodeId, Op, Shape, Tensor, TensorType};

/// A value in the graph being built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(pub NodeId);

pub struct GraphBuilder {
    g: Graph,
    count: usize,
}

impl GraphBuilder {
    pub fn new(name: &str) -> GraphBuilder {
        GraphBuilder { g: Graph::new(name), count: 0 }
    }

    fn name(&mut self, op: &str) -> String {
        self.count += 1;
        format!("{op}_{}", self.count)
    }

    fn op(&mut self, op: Op, operands: &[Var]) -> Result<Var> {
        let name = self.name(op.mnemonic());
        let ids: Vec<NodeId> = operands.iter().map(|v| v.0).collect();
        Ok(Var(self.g.add(op, &ids, name)?))
    }

    /// A float input of shape `[N, dims...]` (N is the batch size).
    pub fn input(&mut self, name: &str, dims: &[usize]) -> Var {
        Var(self.g.add_input(name, TensorType::f32(Shape::batched(dims))))
    }

    /// An input of any type.
    pub fn input_typed(&mut self, name: &str, ty: TensorType) -> Var {
        Var(self.g.add_input(name, ty))
    }

    pub fn constant(&mut self, value: ArrayD<f32>) -> Var {
        let name = self.name("const");
        Var(self.g.add_const(Tensor::F32(value), name))
    }

    /// `x · weightᵀ + bias`, with `weight` shaped [out, in] as in PyTorch's `nn.Linear`.
    pub fn linear(&mut self, x: Var, weight: Array2<f32>, bias: Option<Array1<f32>>) -> Result<Var> {
        let w = self.constant(weight.into_dyn());
        let mut operands = vec![x, w];
        if let Some(b) = bias {
            operands.push(self.constant(b.into_dyn()));
        }
        self.op(Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true }, &operands)
    }

    /// ONNX Gemm on two graph values (and an optional third): alpha·A·B + beta·C.
    pub fn gemm(&mut self, a: Var, b: Var, c: Option<Var>, trans_b: bool) -> Result<Var> {
        let mut operands = vec![a, b];
        operands.extend(c);
        self.op(Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b }, &operands)
    }

    pub fn matmul(&mut self, a: Var, b: Var) -> Result<Var> {
        self.op(Op::MatMul, &[a, b])
    }

    /// 2-D convolution of an NCHW input with weights [M, C/group, kH, kW].
    pub fn conv2d(
        &mut self,
        x: Var,
        weight: Array4<f32>,
        bias: Option<Array1<f32>>,
        stride: usize,
        padding: usize,
    ) -> Result<Var> {
        let conv = Conv2d { strides: [stride; 2], pads: [padding; 4], dilations: [1, 1], group: 1 };
        self.conv2d_with(x, weight, bias, conv)
    }

    pub fn conv2d_with(&mut self, x: Var, weight: Array4<f32>, bias: Option<Array1<f32>>, conv: Conv2d) -> Result<Var> {
        let w = self.constant(weight.into_dyn());
        let mut operands = vec![x, w];
        if let Some(b) = bias {
            operands.push(self.constant(b.into_dyn()));
        }
        self.op(Op::Conv(conv), &operands)
    }

    pub fn unary(&mut self, x: Var, f: UnaryFn) -> Result<Var> {
        self.op(Op::Unary(f), &[x])
    }

    pub fn relu(&mut self, x: Var) -> Result<Var> {
        self.unary(x, UnaryFn::Relu)
    }

    pub fn sigmoid(&mut self, x: Var) -> Result<Var> {
        self.unary(x, UnaryFn::Sigmoid)
    }

    pub fn tanh(&mut self, x: Var) -> Result<Var> {
        self.unary(x, UnaryFn::Tanh)
    }

    pub fn gelu(&mut self, x: Var) -> Result<Var> {
        self.unary(x, UnaryFn::Gelu { tanh: false })
    }

    pub fn binary(&mut self, a: Var, b: Var, f: BinaryFn) -> Result<Var> {
        self.op(Op::Binary(f), &[a, b])
    }

    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        self.binary(a, b, BinaryFn::Add)
    }

    pub fn sub(&mut self, a: Var, b: Var) -> Result<Var> {
        self.binary(a, b, BinaryFn::Sub)
    }

    pub fn mul(&mut self, a: Var, b: Var) -> Result<Var> {
        self.binary(a, b, BinaryFn::Mul)
    }

    pub fn max_pool2d(&mut self, x: Var, kernel: usize, stride: usize) -> Result<Var> {
        self.op(Op::MaxPool(window(kernel, stride)), &[x])
    }

    pub fn avg_pool2d(&mut self, x: Var, kernel: usize, stride: usize) -> Result<Var> {
        self.op(Op::AvgPool(window(kernel, stride)), &[x])
    }

    pub fn global_avg_pool(&mut self, x: Var) -> Result<Var> {
        self.op(Op::GlobalAvgPool, &[x])
    }

    /// Inference batch normalisation over axis 1.
    pub fn batch_norm(
        &mut self,
        x: Var,
        scale: Array1<f32>,
        bias: Array1<f32>,
        mean: Array1<f32>,
        var: Array1<f32>,
        epsilon: f32,
    ) -> Result<Var> {
        let params: Vec<Var> = [scale, bias, mean, var].into_iter().map(|p| self.constant(p.into_dyn())).collect();
        self.op(Op::BatchNorm { epsilon }, &[x, params[0], params[1], params[2], params[3]])
    }

    pub fn reduce_sum(&mut self, x: Var, axes: &[usize], keepdims: bool) -> Result<Var> {
        self.op(Op::Reduce { kind: ReduceKind::Sum, axes: axes.to_vec(), keepdims }, &[x])
    }

    /// Reshape each sample to `dims` (the batch axis stays in front).
    pub fn reshape(&mut self, x: Var, dims: &[usize]) -> Result<Var> {
        self.op(Op::Reshape { shape: Shape::batched(dims) }, &[x])
    }

    /// [N, a, b, ...] → [N, a·b·...].
    pub fn flatten(&mut self, x: Var) -> Result<Var> {
        let vol = self.g.node(x.0).ty.shape.fixed_volume();
        self.reshape(x, &[vol])
    }

    pub fn softmax(&mut self, x: Var, axis: usize) -> Result<Var> {
        self.op(Op::Softmax { axis }, &[x])
    }

    pub fn argmax(&mut self, x: Var, axis: usize) -> Result<Var> {
        self.op(Op::ArgMax { axis, keepdims: false, select_last: false }, &[x])
    }

    /// Permute the axes of each value (`perm` over all axes, the batch axis staying first).
    pub fn transpose(&mut self, x: Var, perm: &[usize]) -> Result<Var> {
        self.op(Op::Transpose { perm: perm.to_vec() }, &[x])
    }

    /// The type a value has.
    pub fn type_of(&self, x: Var) -> &TensorType {
        &self.g.node(x.0).ty
    }

    pub fn output(&mut self, name: &str, x: Var) {
        self.g.set_output(name, x.0);
    }

    /// The finished, verified graph.
    pub fn finish(mut self) -> Result<Graph> {
        self.g.remove_dead();
        veil_ir::verify(&self.g)?;
        Ok(self.g)
    }
}

/// The float step of stochastic gradient descent for a logistic regression, one-vs-rest
/// when `scores` > 1: the graph veil compiles for encrypted training.
///
/// Inputs (N independent steps at once, usually N = 1): features `x [N, B, F]`, labels
/// `y [N, B, S]` (0 or 1 per score column: the positive class for a binary model, one-hot
/// for S ≥ 2 classes), weights `w [N, F, S]` and bias `b [N, 1, S]`. Outputs `w_next`,
/// `b_next` of the same shapes:
///
/// ```text
/// p = σ(x·w + b)                         [N, B, S]
/// w_next = w − lr·(xᵀ·(p − y)/B + l2·w)
/// b_next = b − lr·Σ_batch (p − y)/B
/// ```
///
/// the gradient of the mean log-loss (Bishop, *Pattern Recognition and Machine Learning*,
/// §4.3.2, eq. 4.91), with an L2 penalty on the weights (not the bias) as in
/// scikit-learn's `SGDClassifier(penalty="l2")`.
///
/// ```
/// # fn main() -> veil_frontend::Result<()> {
/// let step = veil_frontend::dsl::logistic_sgd_step(30, 1, 8, 1.0, 0.0)?;
/// assert_eq!(step.outputs().len(), 2);
/// # Ok(())
/// # }
/// ```
pub fn logistic_sgd_step(features: usize, scores: usize, batch: usize, lr: f32, l2: f32) -> Result<Graph> {
    let mut g = GraphBuilder::new("logistic_sgd_step");
    let x = g.input("x", &[batch, features]);
    let y = g.input("y", &[batch, scores]);
    let w = g.input("w", &[features, scores]);
    let b = g.input("b", &[1, scores]);
    let z = g.matmul(x, w)?;
    let z = g.add(z, b)?;
    let p = g.sigmoid(z)?;
    let e = g.sub(p, y)?;
    let xt = g.transpose(x, &[0, 2, 1])?;
    let grad = g.matmul(xt, e)?;
    let step = g.constant(ArrayD::from_elem(vec![], lr / batch as f32));
    let mut dw = g.mul(grad, step)?;
    if l2 > 0.0 {
        let decay = g.constant(ArrayD::from_elem(vec![], lr * l2));
        let wd = g.mul(w, decay)?;
        dw = g.add(dw, wd)?;
    }
    let w_next = g.sub(w, dw)?;
    let gb = g.reduce_sum(e, &[1], true)?;
    let db = g.mul(gb, step)?;
    let b_next = g.sub(b, db)?;
    g.output("w_next", w_next);
    g.output("b_next", b_next);
    g.finish()
}

fn window(kernel: usize, stride: usize) -> Pool2d {
    Pool2d {
        kernel: [kernel; 2],
        strides: [stride; 2],
        pads: [0; 4],
        dilations: [1, 1],
        ceil_mode: false,
        count_include_pad: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_errors_name_the_op() {
        let mut b = GraphBuilder::new("t");
        let x = b.input("x", &[4]);
        let err = b.linear(x, Array2::zeros((2, 5)), None).unwrap_err().to_string();
        assert!(err.contains("gemm") && err.contains("inner dimensions"), "{err}");
    }

    #[test]
    fn sgd_step_moves_weights_against_the_gradient() {
        // one feature, one sample with label 1 and zero weights: p = 0.5, e = −0.5,
        // so w gains lr·x·0.5 and b gains lr·0.5
        let g = logistic_sgd_step(1, 1, 1, 2.0, 0.0).unwrap();
        let t = |v: f32, d: &[usize]| Tensor::F32(ArrayD::from_elem(d.to_vec(), v));
        let out =
            veil_ir::interp::run(&g, &[t(0.5, &[1, 1, 1]), t(1.0, &[1, 1, 1]), t(0.0, &[1, 1, 1]), t(0.0, &[1, 1, 1])])
                .unwrap();
        assert_eq!(out[0].as_f32().unwrap().iter().copied().collect::<Vec<_>>(), vec![0.5]);
        assert_eq!(out[1].as_f32().unwrap().iter().copied().collect::<Vec<_>>(), vec![1.0]);
    }

    #[test]
    fn cnn_builds_and_runs() {
        let mut b = GraphBuilder::new("cnn");
        let x = b.input("img", &[1, 8, 8]);
        let h = b.conv2d(x, Array4::from_elem((2, 1, 3, 3), 0.5), Some(Array1::zeros(2)), 1, 0).unwrap();
        let h = b.relu(h).unwrap();
        let h = b.max_pool2d(h, 2, 2).unwrap();
        let h = b.flatten(h).unwrap();
        assert_eq!(b.type_of(h).shape, Shape::batched(&[18]));
        let y = b.linear(h, Array2::from_elem((3, 18), 1.0), None).unwrap();
        b.output("y", y);
        let g = b.finish().unwrap();
        let out = veil_ir::interp::run(&g, &[Tensor::F32(ArrayD::ones(vec![1, 1, 8, 8]))]).unwrap();
        // every conv output is 9 × 0.5 = 4.5; 18 of them summed
        assert_eq!(out[0].as_f32().unwrap().iter().copied().collect::<Vec<_>>(), vec![81.0; 3]);
    }
}
