//! Element-wise ops: real-valued functions of one encrypted source accumulate as a
//! *pending* function and become one lookup only when an integer is needed (`tabulate`:
//! a whole-torus |x| read for ReLU-like functions, a table otherwise); binary ops between
//! encrypted tensors and rescaling to a common scale.

use super::*;

impl Quantizer<'_> {
    /// Start or continue a pending function of one source.
    pub(super) fn pending(&self, v: QVal) -> Pending {
        match v {
            QVal::Fn(p) => p,
            QVal::Enc(q) => Pending {
                src: q.node,
                expr: Expr::binary(
                    BinaryFn::Add,
                    Expr::binary(BinaryFn::Mul, Expr::Input, Expr::Param(0)),
                    Expr::Param(1),
                ),
                params: vec![q.scale, q.offset],
                label: String::new(),
            },
            QVal::Const(_) => unreachable!("constants are folded before quantization"),
        }
    }

    /// Turn a pending function (the value of float node `id`) into its |x| form (see
    /// [`Self::tabulate_kink`]) or else one table lookup (see [`Self::table_lookup`]).
    pub(super) fn tabulate(&mut self, id: NodeId, p: Pending) -> Result<Quantized> {
        if let Some(q) = self.tables.get(&id) {
            return Ok(q.clone());
        }
        if let Some(q) = self.tabulate_kink(id, &p)? {
            self.tables.insert(id, q.clone());
            return Ok(q);
        }
        self.table_lookup(id, p)
    }

    /// `p` as one table lookup whose output is requantized to `act_bits` over the
    /// calibrated range, whatever its form: also what a client decrypts, which must be the
    /// function's value alone (a |x| form would carry the pre-activation's low bits).
    pub(super) fn table_lookup(&mut self, id: NodeId, p: Pending) -> Result<Quantized> {
        if let Some(q) = self.tables.get(&id).filter(|q| matches!(self.out.node(q.node).op, Op::Tlu(_))) {
            return Ok(q.clone());
        }
        // The output is requantized over its calibrated range: headroom there would cost
        // every value resolution (a 25% margin each side lost one sample in 100 on a small
        // classifier). Values beyond it saturate, and `veil predict`/`encrypt` report the
        // samples that reach them.
        let (lo, hi) = self.calib.range(id).ok_or_else(|| self.err(id, "no calibration range"))?;
        let input = match self.out.node(p.src).ty.elem {
            Elem::Enc(r) => r,
            _ => return Err(self.err(id, "lookup source is not encrypted")),
        };
        let levels = ((1u64 << self.cfg.act_bits) - 1) as f64;
        let s = if hi > lo { (hi - lo) / levels } else { lo.abs().max(1.0) };
        let range = Range::new((lo / s).round() as i64, (hi / s).round() as i64);
        let label = if p.label.is_empty() { "requant".to_string() } else { p.label.clone() };
        let tlu =
            Tlu { expr: Expr::quantize(p.expr, Expr::Const(s), range), input, params: p.params, rounding: 0, label };
        let name = self.g.node(id).name.clone();
        let node = self.out.add(Op::Tlu(Box::new(tlu)), &[p.src], name)?;
        let dims = self.sample_dims(id);
        let q = Quantized { node, scale: ArrayD::from_elem(dims.clone(), s), offset: ArrayD::zeros(dims) };
        self.tables.insert(id, q.clone());
        Ok(q)
    }

    /// A constant broadcast to the per-sample shape of node `id`.
    pub(super) fn sample_const(&self, id: NodeId, c: &ArrayD<f32>) -> Result<ArrayD<f64>> {
        let full = self.g.node(id).ty.shape.concrete(1);
        let has_batch = self.g.node(id).ty.shape.has_batch();
        let b = c.broadcast(IxDyn(&full)).ok_or_else(|| {
            self.unsupported(id, format!("constant of shape {:?} does not broadcast to the sample", c.shape()))
        })?;
        let b = b.mapv(|v| v as f64);
        Ok(if has_batch { b.index_axis(Axis(0), 0).to_owned() } else { b })
    }

    /// x·k + b for clear per-element k, b (of the per-sample shape of x).
    pub(super) fn affine(&mut self, x: NodeId, k: &ArrayD<f64>, b: &ArrayD<f64>) -> Result<QVal> {
        match self.val(x) {
            QVal::Enc(q) => {
                let scale = &q.scale * k;
                let offset = &q.offset * k + b;
                Ok(QVal::Enc(Quantized { node: q.node, scale, offset }))
            }
            QVal::Fn(mut p) => {
                let (ik, ib) = (p.params.len(), p.params.len() + 1);
                p.params.push(k.clone());
                p.params.push(b.clone());
                p.expr =
                    Expr::binary(BinaryFn::Add, Expr::binary(BinaryFn::Mul, p.expr, Expr::Param(ik)), Expr::Param(ib));
                Ok(QVal::Fn(p))
            }
            QVal::Const(_) => unreachable!("constants are folded before quantization"),
        }
    }

    pub(super) fn binary(&mut self, id: NodeId, f: BinaryFn, a: NodeId, b: NodeId) -> Result<QVal> {
        let dims = self.sample_dims(id);
        match (self.val(a), self.val(b)) {
            (QVal::Const(_), QVal::Const(_)) => Err(self.err(id, "constant operands should have been folded")),
            (x, QVal::Const(c)) => {
                let c = self.sample_const(id, &c)?;
                self.check_same_dims(id, a)?;
                match f {
                    BinaryFn::Add => self.affine(a, &ArrayD::ones(dims), &c),
                    BinaryFn::Sub => self.affine(a, &ArrayD::ones(dims), &-c),
                    BinaryFn::Mul => self.affine(a, &c, &ArrayD::zeros(dims)),
                    BinaryFn::Div => self.affine(a, &c.mapv(|v| 1.0 / v), &ArrayD::zeros(dims)),
                    _ => Ok(QVal::Fn(self.with_param(x, f, c, false))),
                }
            }
            (QVal::Const(c), y) => {
                let c = self.sample_const(id, &c)?;
                self.check_same_dims(id, b)?;
                match f {
                    BinaryFn::Add => self.affine(b, &ArrayD::ones(dims), &c),
                    BinaryFn::Sub => self.affine(b, &-ArrayD::<f64>::ones(dims), &c),
                    BinaryFn::Mul => self.affine(b, &c, &ArrayD::zeros(dims)),
                    _ => Ok(QVal::Fn(self.with_param(y, f, c, true))),
                }
            }
            (x, y) => {
                let (sx, sy) = (source(&x), source(&y));
                if sx == sy && self.sample_dims(a) == self.sample_dims(b) {
                    // Both are functions of the same encrypted tensor: still one lookup.
                    let px = self.pending(x);
                    let py = self.pending(y);
                    let shift = px.params.len();
                    let mut params = px.params;
                    params.extend(py.params);
                    let expr = Expr::binary(f, px.expr, py.expr.shift_params(shift));
                    return Ok(QVal::Fn(Pending {
                        src: px.src,
                        expr,
                        params,
                        label: join_label(&join_label(&px.label, f.name()), &py.label),
                    }));
                }
                match f {
                    BinaryFn::Add | BinaryFn::Sub => self.add_enc(id, f, a, b),
                    _ => Err(self.unsupported(
                        id,
                        format!(
                            "{} of two encrypted tensors computed from different inputs is not supported",
                            f.name()
                        ),
                    )),
                }
            }
        }
    }

    pub(super) fn check_same_dims(&self, id: NodeId, operand: NodeId) -> Result<()> {
        if self.sample_dims(id) != self.sample_dims(operand) {
            return Err(self.unsupported(id, "a constant that broadcasts the encrypted operand to a larger shape"));
        }
        Ok(())
    }

    /// f(x, c) or f(c, x) for a non-linear f and a clear per-element c.
    pub(super) fn with_param(&self, x: QVal, f: BinaryFn, c: ArrayD<f64>, const_first: bool) -> Pending {
        let mut p = self.pending(x);
        let k = p.params.len();
        p.params.push(c);
        p.expr =
            if const_first { Expr::binary(f, Expr::Param(k), p.expr) } else { Expr::binary(f, p.expr, Expr::Param(k)) };
        p.label = join_label(&p.label, f.name());
        p
    }

    /// Sum or difference of encrypted tensors from different sources: exact when they share
    /// a scale; otherwise the finer one is requantized to the coarser scale first.
    pub(super) fn add_enc(&mut self, id: NodeId, f: BinaryFn, a: NodeId, b: NodeId) -> Result<QVal> {
        let mut qa = self.enc_operand(id, a)?;
        let mut qb = self.enc_operand(id, b)?;
        let dims = self.sample_dims(id);
        let sa = qa.scale.broadcast(IxDyn(&dims)).map(|v| v.to_owned());
        let sb = qb.scale.broadcast(IxDyn(&dims)).map(|v| v.to_owned());
        let (Some(sa), Some(sb)) = (sa, sb) else {
            return Err(self.unsupported(id, "operands do not broadcast"));
        };
        if !close(&sa, &sb) {
            // The coarser magnitude (scales are negative after a negation, zero where a
            // constant mask removed a value); a value whose scales are both 0 is 0.
            let target = ndarray::Zip::from(&sa).and(&sb).map_collect(|&x, &y| {
                let m = x.abs().max(y.abs());
                if m > 0.0 {
                    m
                } else {
                    1.0
                }
            });
            if !close(&sa, &target) {
                qa = self.rescale(id, a, qa, &target)?;
            }
            if !close(&sb, &target) {
                qb = self.rescale(id, b, qb, &target)?;
            }
        }
        let op = if f == BinaryFn::Add { Op::AddEnc } else { Op::SubEnc };
        let name = self.g.node(id).name.clone();
        let node = self.out.add(op, &[qa.node, qb.node], name)?;
        let oa = qa.offset.broadcast(IxDyn(&dims)).expect("checked").to_owned();
        let ob = qb.offset.broadcast(IxDyn(&dims)).expect("checked").to_owned();
        let offset = if f == BinaryFn::Add { oa + ob } else { oa - ob };
        let scale = qa.scale.broadcast(IxDyn(&dims)).expect("checked").to_owned();
        Ok(QVal::Enc(Quantized { node, scale, offset }))
    }

    /// Requantize an encrypted tensor to a coarser scale (the offset, in real units, stays):
    /// one lookup, or none when the ratios are whole numbers.
    pub(super) fn rescale(
        &mut self,
        id: NodeId,
        operand: NodeId,
        q: Quantized,
        target: &ArrayD<f64>,
    ) -> Result<Quantized> {
        let input = self.enc_range(q.node);
        let ratio = &q.scale / target;
        let name = format!("{}_rescaled", self.g.node(operand).name);
        if ratio.iter().all(|r| (r - r.round()).abs() < 1e-9) {
            // Whole ratios (a sign flip, a masked-out value): exact and free, no lookup.
            let factor = ratio.mapv(|r| r.round() as i64);
            let lin = Linear::new(LinearKind::Scale { factor }, ArrayD::zeros(vec![]), "rescale");
            let node = self.out.add(Op::Linear(Box::new(lin)), &[q.node], name)?;
            return Ok(Quantized { node, scale: target.clone(), offset: q.offset });
        }
        let (lo, hi) = ratio.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &r| {
            let (a, b) = (r * input.lo as f64, r * input.hi as f64);
            (l.min(a.min(b)), h.max(a.max(b)))
        });
        let range = Range::new(lo.floor() as i64, hi.ceil() as i64);
        let expr = Expr::Clamp(
            Box::new(Expr::Round(Box::new(Expr::binary(BinaryFn::Mul, Expr::Input, Expr::Param(0))))),
            range.lo as f64,
            range.hi as f64,
        );
        let tlu = Tlu { expr, input, params: vec![ratio], rounding: 0, label: "rescale".into() };
        let node = self.out.add(Op::Tlu(Box::new(tlu)), &[q.node], name).map_err(|e| self.err(id, e.to_string()))?;
        Ok(Quantized { node, scale: target.clone(), offset: q.offset })
    }
}
