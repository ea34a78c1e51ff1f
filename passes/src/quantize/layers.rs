//! Linear layers and their relatives on encrypted tensors: dense, convolution, pooling,
//! sums and extrema over axes, layout ops. Weights are folded with the input scales and
//! quantized per output channel (scales chosen in `scales`).

use super::*;

impl Quantizer<'_> {
    /// x·W + bias over the last axis; `w` is [K, M] in real units.
    pub(super) fn dense(&mut self, id: NodeId, x: Quantized, w: Array2<f64>, bias: Vec<f64>) -> Result<QVal> {
        let in_dims = self.sample_dims(self.float_operand(id, 0));
        self.dense_over(id, x, in_dims, w, bias)
    }

    /// [`Self::dense`] on an input of per-sample shape `in_dims` (which a composed layer's
    /// concatenated input does not share with the float operand).
    pub(super) fn dense_over(
        &mut self,
        id: NodeId,
        x: Quantized,
        in_dims: Vec<usize>,
        w: Array2<f64>,
        bias: Vec<f64>,
    ) -> Result<QVal> {
        let k = *in_dims.last().ok_or_else(|| self.err(id, "dense on a scalar"))?;
        if w.nrows() != k {
            return Err(self.err(id, format!("weights take {} inputs, the tensor has {k}", w.nrows())));
        }
        let s_in = along_last(&x.scale, &in_dims)
            .ok_or_else(|| self.unsupported(id, "input scales vary along more than the contracted axis"))?;
        // Fold input scales into the weights, then quantize each output row.
        let eff = Array2::from_shape_fn((w.ncols(), k), |(j, kk)| w[[kk, j]] * s_in[kk]);
        let (q, s_out) = self.quantize_rows(&eff);
        // per output feature, whatever the rank: a leading size-1 axis must not cost accuracy
        let spans = self.feature_spans(id);
        let (q, s_out) = equalize(&eff, q, s_out, spans.as_deref());
        let (q, s_out) = self.fill_slots(id, &eff, q, s_out, spans.as_deref());
        // Offsets enter as a clear per-output offset: W·offset + bias, per sample position.
        let off = x.offset.broadcast(IxDyn(&in_dims)).ok_or_else(|| self.err(id, "offset shape"))?.to_owned();
        let off2 = off.to_shape((off.len() / k, k)).map_err(|e| self.err(id, e.to_string()))?.to_owned();
        let out_off = off2.dot(&w) + &Array2::from_shape_fn((1, w.ncols()), |(_, j)| bias[j]);
        let mut out_dims = in_dims.clone();
        *out_dims.last_mut().expect("non-empty") = w.ncols();
        let offset = out_off
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order(IxDyn(&out_dims))
            .map_err(|e| self.err(id, e.to_string()))?;
        let bias_real = bias;
        let (bias, offset) = self.center(id, &s_out, offset, &out_dims, true);
        let scale = ArrayD::from_shape_vec(vec![w.ncols()], s_out)
            .expect("one per row")
            .broadcast(IxDyn(&out_dims))
            .expect("last axis")
            .to_owned();
        let lin = Linear::new(LinearKind::Dense { weights: q }, bias, self.g.node(id).op.mnemonic());
        let node = self.out.add(Op::Linear(Box::new(lin)), &[x.node], self.g.node(id).name.clone())?;
        if in_dims.len() == 1 {
            let source = kinks::DenseSource {
                float: id,
                node,
                x: x.clone(),
                w: w.clone(),
                bias: bias_real.clone(),
                scale: scale.iter().copied().collect(),
                offset: offset.iter().copied().collect(),
            };
            self.dense_src.insert(node, source);
        }
        Ok(QVal::Enc(Quantized { node, scale, offset }))
    }

    pub(super) fn float_operand(&self, id: NodeId, i: usize) -> NodeId {
        self.g.operands(id)[i]
    }

    pub(super) fn conv(
        &mut self,
        id: NodeId,
        x: Quantized,
        c: &Conv2d,
        w: &ArrayD<f32>,
        b: Option<&ArrayD<f32>>,
    ) -> Result<QVal> {
        let xin = self.float_operand(id, 0);
        let in_dims = self.sample_dims(xin);
        let s_in = per_channel_of(&x.scale, &in_dims)
            .ok_or_else(|| self.unsupported(id, "input scales vary within a channel"))?;
        let w4: Array4<f32> = w.clone().into_dimensionality().map_err(|_| self.err(id, "weights must be 4-D"))?;
        let (m, cg, kh, kw) = w4.dim();
        let mg = m / c.group;
        let eff = Array2::from_shape_fn((m, cg * kh * kw), |(o, r)| {
            let ci = r / (kh * kw);
            let chan = (o / mg) * cg + ci;
            w4[[o, ci, (r / kw) % kh, r % kw]] as f64 * s_in[chan]
        });
        let (q, s_out) = self.quantize_rows(&eff);
        let spans = self.channel_spans(id);
        let (q, s_out) = equalize(&eff, q, s_out, spans.as_deref());
        let (q, s_out) = self.fill_slots(id, &eff, q, s_out, spans.as_deref());
        let q4 = q.into_shape_with_order((m, cg, kh, kw)).map_err(|e| self.err(id, e.to_string()))?;
        // Offsets (and zero padding, whose real value is 0) enter through a float
        // convolution of the offset image: exact per output position.
        let off_img = x
            .offset
            .broadcast(IxDyn(&in_dims))
            .ok_or_else(|| self.err(id, "offset shape"))?
            .mapv(|v| v as f32)
            .insert_axis(Axis(0));
        let mut args: Vec<Tensor> = vec![Tensor::F32(off_img), Tensor::F32(w.clone())];
        if let Some(b) = b {
            args.push(Tensor::F32(b.clone()));
        }
        let refs: Vec<&Tensor> = args.iter().collect();
        let off = eval_op(&Op::Conv(c.clone()), &refs).map_err(|e| self.err(id, e))?;
        let offset = off.to_f32().index_axis(Axis(0), 0).mapv(|v| v as f64);
        let out_dims = offset.shape().to_vec();
        let (bias, offset) = self.center(id, &s_out, offset, &out_dims, false);
        let scale = per_channel(&s_out, &out_dims);
        let lin = Linear::new(LinearKind::Conv { weights: q4, conv: c.clone() }, bias, "conv");
        let node = self.out.add(Op::Linear(Box::new(lin)), &[x.node], self.g.node(id).name.clone())?;
        Ok(QVal::Enc(Quantized { node, scale, offset }))
    }

    pub(super) fn avg_pool(&mut self, id: NodeId, x: Quantized, p: &Pool2d) -> Result<QVal> {
        let in_dims = self.sample_dims(self.float_operand(id, 0));
        let s_in = per_channel_of(&x.scale, &in_dims)
            .ok_or_else(|| self.unsupported(id, "input scales vary within a channel"))?;
        // The integer op sums each window; the divisor (which varies at padded edges) goes
        // into the output scale, and offsets through a float average pool.
        let float = |img: ArrayD<f32>| -> Result<ArrayD<f32>> {
            let t = eval_op(&Op::AvgPool(p.clone()), &[&Tensor::F32(img.insert_axis(Axis(0)))])
                .map_err(|e| self.err(id, e))?;
            Ok(t.to_f32().index_axis(Axis(0), 0).to_owned())
        };
        let ones = ArrayD::<f32>::ones(in_dims.clone());
        let avg_ones = float(ones.clone())?;
        let sums = eval_op(
            &Op::Linear(Box::new(Linear::new(LinearKind::SumPool { pool: p.clone() }, ArrayD::zeros(vec![]), "sum"))),
            &[&Tensor::I64(ones.mapv(|_| 1i64).insert_axis(Axis(0)))],
        )
        .map_err(|e| self.err(id, e))?;
        let sums = sums.as_i64().expect("integer").index_axis(Axis(0), 0).mapv(|v| v as f64);
        let out_dims = avg_ones.shape().to_vec();
        let s_chan = per_channel(&s_in, &out_dims);
        let scale = ndarray::Zip::from(&s_chan).and(&avg_ones).and(&sums).map_collect(|&s, &a, &n| s * a as f64 / n);
        let offset =
            float(x.offset.broadcast(IxDyn(&in_dims)).expect("offset shape").mapv(|v| v as f32))?.mapv(|v| v as f64);
        let lin = Linear::new(LinearKind::SumPool { pool: p.clone() }, ArrayD::zeros(vec![]), "avg_pool");
        let node = self.out.add(Op::Linear(Box::new(lin)), &[x.node], self.g.node(id).name.clone())?;
        Ok(QVal::Enc(Quantized { node, scale, offset }))
    }

    /// Sum over `axes` (axes of the full tensor), dividing the real value by `div`.
    pub(super) fn sum(&mut self, id: NodeId, x: Quantized, axes: Vec<usize>, keepdims: bool, div: f64) -> Result<QVal> {
        let xin = self.float_operand(id, 0);
        let in_dims = self.sample_dims(xin);
        let batch = self.g.node(xin).ty.shape.has_batch() as usize;
        let sample_axes: Vec<usize> = axes.iter().map(|&a| a - batch).collect();
        let full_scale = x.scale.broadcast(IxDyn(&in_dims)).expect("scale shape").to_owned();
        let full_offset = x.offset.broadcast(IxDyn(&in_dims)).expect("offset shape").to_owned();
        let (x, full_scale, mut offset) = match reduce_uniform(&full_scale, &sample_axes) {
            Some(_) => (x, full_scale, full_offset),
            None => self.common_scale(id, x, &full_scale, &full_offset, &sample_axes)?,
        };
        let reduced_first = reduce_uniform(&full_scale, &sample_axes).expect("one scale along the summed axes");
        let mut scale = reduced_first.mapv(|s| s / div);
        let mut sorted = sample_axes.clone();
        sorted.sort_unstable();
        for &a in sorted.iter().rev() {
            offset = offset.sum_axis(Axis(a));
        }
        if keepdims {
            for &a in &sorted {
                offset.insert_axis_inplace(Axis(a));
                scale.insert_axis_inplace(Axis(a));
            }
        }
        let offset = offset.mapv(|o| o / div);
        let lin = Linear::new(LinearKind::Sum { axes, keepdims }, ArrayD::zeros(vec![]), self.g.node(id).op.mnemonic());
        let node = self.out.add(Op::Linear(Box::new(lin)), &[x.node], self.g.node(id).name.clone())?;
        let out_dims = self.sample_dims(id);
        let scale = scale.into_shape_with_order(IxDyn(&out_dims)).map_err(|e| self.err(id, e.to_string()))?;
        Ok(QVal::Enc(Quantized { node, scale, offset }))
    }

    /// Bring values with different scales along `axes` (sample axes) to one scale per
    /// lane before they are summed, as a dense layer's weights are quantized: integer
    /// factors `round(s_i / s)` of `weight_bits`, with `s = max |s_i| / (2^(bits−1) − 1)`
    /// over the lane. This is how `Σ x_i · c_i` (a Mul by clear values, then a sum) runs.
    /// Returns the scaled tensor with its per-element scale (now uniform) and offset.
    pub(super) fn common_scale(
        &mut self,
        id: NodeId,
        x: Quantized,
        scale: &ArrayD<f64>,
        offset: &ArrayD<f64>,
        axes: &[usize],
    ) -> Result<(Quantized, ArrayD<f64>, ArrayD<f64>)> {
        let qmax = ((1i64 << (self.cfg.weight_bits - 1)) - 1).max(1) as f64;
        let mut lane_max = scale.mapv(f64::abs);
        for &a in axes {
            lane_max = lane_max.fold_axis(Axis(a), 0.0f64, |m, &v| m.max(v)).insert_axis(Axis(a));
        }
        let common = lane_max.mapv(|m| if m > 0.0 { m / qmax } else { 1.0 });
        let common = common.broadcast(scale.raw_dim()).expect("lanes broadcast").to_owned();
        let factor = ndarray::Zip::from(scale).and(&common).map_collect(|&s, &c| (s / c).round() as i64);
        let label = format!("{}_weights", self.g.node(id).op.mnemonic());
        let lin = Linear::new(LinearKind::Scale { factor }, ArrayD::zeros(vec![]), label);
        let name = format!("{}_weighted", self.g.node(id).name);
        let node = self.out.add(Op::Linear(Box::new(lin)), &[x.node], name)?;
        Ok((Quantized { node, scale: common.clone(), offset: offset.clone() }, common, offset.clone()))
    }

    /// ReduceMax/ReduceMin as trees of exact element-wise maxima, one reduced axis at a
    /// time; a minimum is `a + b − max(a, b)`, which costs no extra lookup. The values
    /// compared must share a scale and offset along the reduced axes.
    pub(super) fn extremum(
        &mut self,
        id: NodeId,
        x: Quantized,
        axes: &[usize],
        keepdims: bool,
        max: bool,
    ) -> Result<QVal> {
        let xin = self.float_operand(id, 0);
        if !self.g.node(xin).ty.shape.has_batch() {
            return Err(self.unsupported(id, "a reduction of an unbatched tensor"));
        }
        let in_dims = self.sample_dims(xin);
        let sample_axes: Vec<usize> = axes.iter().map(|&a| a - 1).collect();
        let mut x = self.positive_scales(id, x, &in_dims)?;
        let mut scale = x.scale.broadcast(IxDyn(&in_dims)).expect("scale").to_owned();
        if reduce_uniform(&scale, &sample_axes).is_none() {
            // Compared values need one scale: the coarsest magnitude of the lane (exact and
            // free for a sign flip or whole ratios, a lookup otherwise).
            let mut lane = scale.mapv(f64::abs);
            for &a in &sample_axes {
                lane = lane.fold_axis(Axis(a), 0.0f64, |m, &v| m.max(v)).insert_axis(Axis(a));
            }
            let target =
                lane.mapv(|m| if m > 0.0 { m } else { 1.0 }).broadcast(scale.raw_dim()).expect("lane").to_owned();
            x.scale = scale;
            x = self.rescale(id, xin, x, &target)?;
            scale = target;
        }
        let mut offset = x.offset.broadcast(IxDyn(&in_dims)).expect("offset").to_owned();
        if reduce_uniform(&offset, &sample_axes).is_none() {
            // And one offset: each value moves by whole steps toward the lane's smallest
            // offset (within half a step of it, as rounding to the scale is).
            let mut lane = offset.clone();
            for &a in &sample_axes {
                lane = lane.fold_axis(Axis(a), f64::INFINITY, |m, &v| m.min(v)).insert_axis(Axis(a));
            }
            let lane = lane.broadcast(offset.raw_dim()).expect("lane").to_owned();
            let shift = ndarray::Zip::from(&offset)
                .and(&lane)
                .and(&scale)
                .map_collect(|&o, &l, &s| ((o - l) / s).round() as i64);
            let lin = Linear::new(LinearKind::Scale { factor: ArrayD::ones(vec![]) }, shift, "shift");
            let name = format!("{}_shifted", self.g.node(id).name);
            x.node = self.out.add(Op::Linear(Box::new(lin)), &[x.node], name)?;
            offset = lane;
        }
        let (mut scale, mut offset) =
            match (reduce_uniform(&scale, &sample_axes), reduce_uniform(&offset, &sample_axes)) {
                (Some(s), Some(o)) => (s, o),
                _ => return Err(self.unsupported(id, "offsets vary along the reduced axes")),
            };
        let name = self.g.node(id).name.clone();
        let mut cur = x.node;
        for &axis in axes {
            let taps = (0..in_dims[axis - 1])
                .map(|i| {
                    let indices = ArrayD::from_shape_vec(vec![1], vec![i as i64]).expect("1-D");
                    self.out.add(Op::Gather { axis, indices }, &[cur], format!("{name}_ax{axis}_{i}"))
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            cur = self.extremum_tree(&format!("{name}_ax{axis}"), taps, max)?;
        }
        if !keepdims {
            cur = self.out.add(Op::Reshape { shape: self.g.node(id).ty.shape.clone() }, &[cur], name)?;
        } else {
            let mut sorted = sample_axes;
            sorted.sort_unstable();
            for &a in &sorted {
                scale.insert_axis_inplace(Axis(a));
                offset.insert_axis_inplace(Axis(a));
            }
        }
        let out_dims = self.sample_dims(id);
        let scale = scale.into_shape_with_order(IxDyn(&out_dims)).map_err(|e| self.err(id, e.to_string()))?;
        let offset = offset.into_shape_with_order(IxDyn(&out_dims)).map_err(|e| self.err(id, e.to_string()))?;
        Ok(QVal::Enc(Quantized { node: cur, scale, offset }))
    }

    /// A balanced tree of maxima a + b + |a − b| (twice the max) of equally shaped
    /// encrypted values, |·| read on the whole torus: the root holds 2^levels × the max.
    pub(super) fn doubling_max_tree(&mut self, name: &str, mut taps: Vec<NodeId>) -> Result<(NodeId, u32)> {
        let mut level = 0;
        while taps.len() > 1 {
            let mut next = Vec::new();
            for (i, pair) in taps.chunks(2).enumerate() {
                let tag = format!("{name}_max{level}_{i}");
                let [a, b] = *pair else {
                    let two = Linear::new(
                        LinearKind::Scale { factor: ArrayD::from_elem(vec![], 2) },
                        ArrayD::zeros(vec![]),
                        "x2",
                    );
                    next.push(self.out.add(Op::Linear(Box::new(two)), &[pair[0]], format!("{tag}_x2"))?);
                    continue;
                };
                let sum = self.out.add(Op::AddEnc, &[a, b], format!("{tag}_sum"))?;
                let diff = self.out.add(Op::SubEnc, &[a, b], format!("{tag}_diff"))?;
                let abs = self.out.add(Op::AbsEnc { rounding: 0, shift: 0 }, &[diff], format!("{tag}_abs"))?;
                next.push(self.out.add(Op::AddEnc, &[sum, abs], tag)?);
            }
            taps = next;
            level += 1;
        }
        Ok((taps[0], level))
    }

    /// Max pooling of a pending monotone non-decreasing function f of one source (ReLU
    /// after a convolution), when `Placement::whole_torus_max`: pool the source with
    /// [`Self::doubling_max_tree`] and keep f pending on the pooled values, since
    /// max(f(a), f(b)) = f(max(a, b)). `None` when the operand is not of that form.
    pub(super) fn pool_then_activate(&mut self, id: NodeId, operand: NodeId, p: &Pool2d) -> Result<Option<QVal>> {
        if !self.placement.whole_torus_max {
            return Ok(None);
        }
        let QVal::Fn(pend) = self.val(operand) else { return Ok(None) };
        let in_dims = self.sample_dims(operand);
        if in_dims.len() != 3 || sample_dims(&self.out.node(pend.src).ty.shape) != in_dims {
            return Ok(None);
        }
        // Padded taps would hold the source's worst-case minimum, whose differences with
        // real taps would widen every |a − b| read of the tensor.
        let [oh, ow] = p.out_size(in_dims[1], in_dims[2]).ok_or_else(|| self.err(id, "window does not fit"))?;
        let span = |o: usize, k: usize| (o - 1) * p.strides[k] + (p.kernel[k] - 1) * p.dilations[k] + 1;
        if p.pads.iter().any(|&v| v > 0) || span(oh, 0) > in_dims[1] || span(ow, 1) > in_dims[2] {
            return Ok(None);
        }
        let mut params = Vec::new();
        for a in &pend.params {
            let Some(v) = per_channel_of(a, &in_dims) else { return Ok(None) };
            params.push(v);
        }
        let bounds: Vec<(f64, f64)> = params
            .iter()
            .map(|v| v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| (l.min(x), h.max(x))))
            .collect();
        if pend.expr.monotone(&bounds) != Some(veil_ir::tlu::Monotone::Increasing) {
            return Ok(None);
        }
        let name = self.g.node(id).name.clone();
        let taps = self.pool_taps(id, pend.src, p)?;
        let (top, levels) = self.doubling_max_tree(&name, taps)?;
        let out_dims = self.sample_dims(id);
        let halve = Expr::binary(BinaryFn::Mul, Expr::Input, Expr::Const(0.5f64.powi(levels as i32)));
        Ok(Some(QVal::Fn(Pending {
            src: top,
            expr: pend.expr.substitute(&halve),
            params: params.iter().map(|v| per_channel(v, &out_dims)).collect(),
            label: join_label(&pend.label, "maxpool"),
        })))
    }

    /// A balanced tree of pairwise maxima (or minima) of equally shaped encrypted values.
    pub(super) fn extremum_tree(&mut self, name: &str, mut taps: Vec<NodeId>, max: bool) -> Result<NodeId> {
        let mut level = 0;
        while taps.len() > 1 {
            let mut next = Vec::new();
            for (i, pair) in taps.chunks(2).enumerate() {
                let [a, b] = *pair else {
                    next.push(pair[0]);
                    continue;
                };
                let tag = format!("{name}_{}{level}_{i}", if max { "max" } else { "min" });
                let max_name = if max { tag.clone() } else { format!("{tag}_max") };
                let m = self.out.add(Op::MaxEnc { rounding: 0, diff: None }, &[a, b], max_name)?;
                next.push(if max {
                    m
                } else {
                    let sum = self.out.add(Op::AddEnc, &[a, b], format!("{tag}_sum"))?;
                    let min = self.out.add(Op::SubEnc, &[sum, m], format!("{tag}_diff"))?;
                    // Interval arithmetic cannot see that a + b − max(a, b) is min(a, b).
                    let (ra, rb) = (self.enc_range(a), self.enc_range(b));
                    let range = Range::new(ra.lo.min(rb.lo), ra.hi.min(rb.hi));
                    self.out.add(Op::Assume { range }, &[min], tag)?
                });
            }
            taps = next;
            level += 1;
        }
        Ok(taps[0])
    }

    /// Max pooling as a tree of exact element-wise maxima over the window's taps.
    pub(super) fn max_pool(&mut self, id: NodeId, x: Quantized, p: &Pool2d) -> Result<QVal> {
        let xin = self.float_operand(id, 0);
        let in_dims = self.sample_dims(xin);
        let x = self.positive_scales(id, x, &in_dims)?;
        let scale = x.scale.broadcast(IxDyn(&in_dims)).expect("scale").to_owned();
        let offset = x.offset.broadcast(IxDyn(&in_dims)).expect("offset").to_owned();
        if per_channel_of(&scale, &in_dims).is_none() || per_channel_of(&offset, &in_dims).is_none() {
            return Err(self.unsupported(id, "max pooling needs one scale and offset per channel"));
        }
        let taps = self.pool_taps(id, x.node, p)?;
        // Balanced tree: depth log2(k²) keeps the ranges (and rounding) shallow.
        let top = self.extremum_tree(&self.g.node(id).name.clone(), taps, true)?;
        let out_dims = self.sample_dims(id);
        let s = per_channel_of(&scale, &in_dims).expect("checked");
        let o = per_channel_of(&offset, &in_dims).expect("checked");
        Ok(QVal::Enc(Quantized { node: top, scale: per_channel(&s, &out_dims), offset: per_channel(&o, &out_dims) }))
    }

    /// `x` with every scale made non-negative by negating the integers where it was
    /// negative (exact, no lookup): maxima compare integers, and the largest integer must
    /// be the largest value (a negated input, a batch norm of negative scale).
    fn positive_scales(&mut self, id: NodeId, x: Quantized, dims: &[usize]) -> Result<Quantized> {
        let scale = x.scale.broadcast(IxDyn(dims)).ok_or_else(|| self.err(id, "scale shape"))?.to_owned();
        if scale.iter().all(|&s| s >= 0.0) {
            return Ok(x);
        }
        let factor = scale.mapv(|s| if s < 0.0 { -1i64 } else { 1 });
        let lin = Linear::new(LinearKind::Scale { factor }, ArrayD::zeros(vec![]), "sign");
        let name = format!("{}_sign", self.g.node(id).name);
        let node = self.out.add(Op::Linear(Box::new(lin)), &[x.node], name)?;
        Ok(Quantized { node, scale: scale.mapv(f64::abs), offset: x.offset })
    }

    /// The taps of a max-pooling window over encrypted `x` [C, H, W]: one gathered tensor
    /// of the output's shape per kernel position, padded with the range's lowest value
    /// so that padded taps never win.
    fn pool_taps(&mut self, id: NodeId, x: NodeId, p: &Pool2d) -> Result<Vec<NodeId>> {
        let in_dims = self.sample_dims(self.float_operand(id, 0));
        let (h, w) = (in_dims[1], in_dims[2]);
        let [oh, ow] = p.out_size(h, w).ok_or_else(|| self.err(id, "window does not fit"))?;
        let name = self.g.node(id).name.clone();
        let r = self.enc_range(x);
        // Pad with the smallest representable value so padded taps never win.
        let span_h = (oh - 1) * p.strides[0] + (p.kernel[0] - 1) * p.dilations[0] + 1;
        let span_w = (ow - 1) * p.strides[1] + (p.kernel[1] - 1) * p.dilations[1] + 1;
        let (bottom, right) = ((span_h).saturating_sub(h + p.pads[0]), (span_w).saturating_sub(w + p.pads[1]));
        let mut src = x;
        if p.pads.iter().any(|&v| v > 0) || bottom > 0 || right > 0 {
            let pads = vec![(0, 0), (0, 0), (p.pads[0], bottom), (p.pads[1], right)];
            src = self.out.add(Op::Pad { pads, value: r.lo as f32 }, &[src], format!("{name}_padded"))?;
        }
        let mut taps = Vec::new();
        for ki in 0..p.kernel[0] {
            let rows: Vec<i64> = (0..oh).map(|o| (o * p.strides[0] + ki * p.dilations[0]) as i64).collect();
            let by_row = self.out.add(
                Op::Gather { axis: 2, indices: ArrayD::from_shape_vec(vec![oh], rows).expect("1-D") },
                &[src],
                format!("{name}_row{ki}"),
            )?;
            for kj in 0..p.kernel[1] {
                let cols: Vec<i64> = (0..ow).map(|o| (o * p.strides[1] + kj * p.dilations[1]) as i64).collect();
                let tap = self.out.add(
                    Op::Gather { axis: 3, indices: ArrayD::from_shape_vec(vec![ow], cols).expect("1-D") },
                    &[by_row],
                    format!("{name}_tap{ki}{kj}"),
                )?;
                taps.push(tap);
            }
        }
        Ok(taps)
    }

    /// Layout ops move ciphertexts; the per-element scales and offsets move with them.
    pub(super) fn layout(&mut self, id: NodeId, xs: &[Quantized]) -> Result<QVal> {
        let op = self.g.node(id).op.clone();
        if let Op::Pad { value, .. } = &op {
            let x = &xs[0];
            if *value != 0.0 || x.offset.iter().any(|&o| o != 0.0) {
                return Err(self.unsupported(id, "padding an encrypted tensor with a non-zero value or offset"));
            }
        }
        if let Op::Transpose { perm } = &op {
            if self.g.node(id).ty.shape.has_batch() && perm[0] != 0 {
                return Err(self.unsupported(id, "a transpose that moves the batch axis"));
            }
        }
        if !self.g.node(id).ty.shape.has_batch() {
            return Err(self.unsupported(id, "layout on an unbatched tensor"));
        }
        // Run the op on the parameter images (with a batch of one) to move them.
        let ops = self.g.operands(id);
        let mut scales = Vec::new();
        let mut offsets = Vec::new();
        for (x, &o) in xs.iter().zip(&ops) {
            let dims = self.sample_dims(o);
            let batched =
                |a: &ArrayD<f64>| a.broadcast(IxDyn(&dims)).expect("per-sample").to_owned().insert_axis(Axis(0));
            scales.push(batched(&x.scale));
            offsets.push(batched(&x.offset));
        }
        let moved = |arrays: &[ArrayD<f64>], pad_with: f64| -> Result<ArrayD<f64>> {
            let refs: Vec<&ArrayD<f64>> = arrays.iter().collect();
            let a = veil_ir::interp::layout(&op, &refs, pad_with).map_err(|e| self.err(id, e))?;
            Ok(a.index_axis(Axis(0), 0).to_owned())
        };
        let scale = moved(&scales, 1.0)?;
        let offset = moved(&offsets, 0.0)?;
        let ids: Vec<NodeId> = xs.iter().map(|x| x.node).collect();
        let node = self.out.add(op.clone(), &ids, self.g.node(id).name.clone())?;
        Ok(QVal::Enc(Quantized { node, scale, offset }))
    }
}
