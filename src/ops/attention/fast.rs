//! The f32 path on AVX-512: per-task register-tiled products instead of `gemm` crate calls
//! (whose per-call packing and dispatch dominate at these sizes: k = 64, m = 64), causal
//! skipping per micro-tile instead of per query block, and the softmax passes vectorised
//! 16 wide.

use super::{load, rope_scratch, Block, BwdSteps, Dims, HeadLayout, Mat, MatMut, SharedOut};
use super::{Result, Tables, QBLOCK};
use candle_core::bail;
use std::arch::x86_64::*;

/// Columns of a micro-tile (two zmm).
const NR: usize = 32;
/// Most rows of a micro-tile (2·MR zmm accumulators).
const MR: usize = 8;

/// True when the CPU can run this path.
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Per-call parameters.
pub(super) struct Cx<'a> {
    pub dm: Dims,
    pub layout: HeadLayout,
    pub scale: f32,
    pub rope: Option<Tables<'a, f32>>,
}

/// A left operand: `A(r, p) = data[r·rs + p·cs]`.
#[derive(Clone, Copy)]
struct AOp<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// A right operand in column panels of `NR`: `B(p, j) = data[(j / NR)·ps + p·rs + j % NR]`
/// (`ps = NR` for a plain row-major matrix with row stride `rs`).
#[derive(Clone, Copy)]
struct BOp<'a> {
    data: &'a [f32],
    rs: usize,
    ps: usize,
}

/// One micro-tile: `C[R × cols] = (load ? C : 0) + Σ_{p < steps} A(r, p) · B(p, ·)`, with
/// `A(r, p)` at `a + r·ars + p·acs`, `B(p, j)` at `b + p·ldb + j`, `C(r, j)` at `c + r·ldc + j`.
struct Tile {
    c: *mut f32,
    ldc: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    ldb: usize,
    steps: usize,
    cols: usize,
    load: bool,
}

/// Mask of the first `n.min(16)` lanes.
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    ((1u32 << n.min(16)) - 1) as __mmask16
}

/// The product of tile `t` with `R` rows and `NV` zmm of columns (`cols ≤ 16·NV`).
///
/// # Safety
/// Inlined only into code compiled with avx512f; every A, B element of the tile (see
/// [`Tile`], `r < R`, `p < steps`, `j < cols`) is readable, every C element is readable
/// and writable and touched by no one else meanwhile.
#[inline(always)]
unsafe fn kernel<const R: usize, const NV: usize>(t: Tile) {
    let m = [lanes(t.cols), lanes(t.cols.saturating_sub(16))];
    // SAFETY: (all intrinsics and accesses below) avx512f and the operand extents per the
    // contract; masked-off lanes are never accessed, so their addresses may run past the
    // operands (hence `wrapping_add`).
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        if t.load {
            for (r, acc) in acc.iter_mut().enumerate() {
                for (v, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_maskz_loadu_ps(m[v], t.c.wrapping_add(r * t.ldc + 16 * v));
                }
            }
        }
        for p in 0..t.steps {
            let bq = t.b.wrapping_add(p * t.ldb);
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, b) in bv.iter_mut().enumerate() {
                *b = _mm512_maskz_loadu_ps(m[v], bq.wrapping_add(16 * v));
            }
            let ap = t.a.wrapping_add(p * t.acs);
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(ap.wrapping_add(r * t.ars).read());
                for (acc, b) in acc.iter_mut().zip(&bv) {
                    *acc = _mm512_fmadd_ps(*b, av, *acc);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(t.c.wrapping_add(r * t.ldc + 16 * v), m[v], *acc);
            }
        }
    }
}

/// Dispatches tile `t` of `rows` (1 ..= MR) rows to its kernel.
///
/// # Safety
/// As for [`kernel`].
#[inline(always)]
unsafe fn tile(rows: usize, t: Tile) {
    macro_rules! by_rows {
        ($($r:literal)*) => {
            match (rows, t.cols <= 16) {
                $(
                    // SAFETY: forwarded contract.
                    ($r, true) => unsafe { kernel::<$r, 1>(t) },
                    // SAFETY: forwarded contract.
                    ($r, false) => unsafe { kernel::<$r, 2>(t) },
                )*
                _ => unreachable!("micro-tile rows {rows} > {MR}"),
            }
        };
    }
    by_rows!(1 2 3 4 5 6 7 8)
}

/// `C[m × n] (+)= A[m × k] · B[k × n]` in micro-tiles of `MR` rows: the tile of rows
/// `r0 .. r1` computes only columns `0 .. nc` over `k0 .. k1` where
/// `(nc, k0, k1) = shape(r0, r1)` (clamped to `n` and `k`), for the causal structure: the
/// caller knows the rest of A or B is zero there, or never reads those C columns. With
/// `load` false, C columns `0 .. nc` are overwritten (zeros when `k0 = k1`).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
fn product(
    c: MatMut<'_, f32>,
    m: usize,
    n: usize,
    k: usize,
    a: AOp<'_>,
    b: BOp<'_>,
    load: bool,
    shape: impl Fn(usize, usize) -> (usize, usize, usize),
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let np = n.div_ceil(NR);
    let c_ok = (m - 1) * c.rs + n <= c.len && n <= c.rs;
    let a_ok = k == 0 || (m - 1) * a.rs + (k - 1) * a.cs < a.data.len();
    let b_ok = k == 0
        || (b.ps >= NR && (np - 1) * b.ps + (k - 1) * b.rs + (n - (np - 1) * NR) <= b.data.len());
    if !(c_ok && a_ok && b_ok) {
        bail!("attention: internal product bounds");
    }
    for r0 in (0..m).step_by(MR) {
        let r1 = (r0 + MR).min(m);
        let (nc, k0, k1) = shape(r0, r1);
        let (nc, k1) = (nc.min(n), k1.min(k));
        let k0 = k0.min(k1);
        for jp in 0..nc.div_ceil(NR) {
            let t = Tile {
                c: c.ptr.wrapping_add(r0 * c.rs + jp * NR),
                ldc: c.rs,
                a: a.data.as_ptr().wrapping_add(r0 * a.rs + k0 * a.cs),
                ars: a.rs,
                acs: a.cs,
                b: b.data.as_ptr().wrapping_add(jp * b.ps + k0 * b.rs),
                ldb: b.rs,
                steps: k1 - k0,
                cols: NR.min(nc - jp * NR),
                load,
            };
            // SAFETY: this function is compiled with avx512f. The tile lies inside the
            // m × n × k extents checked above (r < r1 ≤ m, k0 ≤ p < k1 ≤ k, columns
            // jp·NR + j < nc ≤ n with panels ps ≥ NR apart), and C is this call's
            // exclusive borrow whose rows do not overlap (n ≤ rs) nor alias A or B.
            unsafe { tile(r1 - r0, t) };
        }
    }
    Ok(())
}

/// Masked load of `s[j .. j + 16]` (lanes past the end read as 0).
#[inline]
#[target_feature(enable = "avx512f")]
fn ld(s: &[f32], j: usize) -> __m512 {
    let n = s.len().saturating_sub(j);
    // SAFETY: only lanes < n, i.e. elements j .. s.len(), are read.
    unsafe { _mm512_maskz_loadu_ps(lanes(n), s.as_ptr().wrapping_add(j)) }
}

/// Masked store into `s[j .. j + 16]` (lanes past the end are dropped).
#[inline]
#[target_feature(enable = "avx512f")]
fn st(s: &mut [f32], j: usize, v: __m512) {
    let n = s.len().saturating_sub(j);
    // SAFETY: only lanes < n, i.e. elements j .. s.len(), are written.
    unsafe { _mm512_mask_storeu_ps(s.as_mut_ptr().wrapping_add(j), lanes(n), v) }
}

/// [`super::super::kernel::exp_f32`] on 16 lanes (the same Cephes polynomial, with fused
/// multiply-adds): −inf and inputs below ln 2^-126 give 0, NaN propagates.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16(x: __m512) -> __m512 {
    const HI: f32 = 88.376_26;
    const LO: f32 = -87.336_55;
    const MAGIC: f32 = 12_582_912.0;
    let s = _mm512_set1_ps;
    // max/min return their second operand when either is NaN: NaN propagates.
    let xc = _mm512_min_ps(s(HI), _mm512_max_ps(s(LO), x));
    let z = _mm512_fmadd_ps(xc, s(std::f32::consts::LOG2_E), s(MAGIC));
    let n = _mm512_sub_ps(z, s(MAGIC));
    let ni = _mm512_sub_epi32(
        _mm512_castps_si512(z),
        _mm512_set1_epi32(MAGIC.to_bits() as i32),
    );
    let r = _mm512_fnmadd_ps(n, s(0.693_359_4), xc);
    let r = _mm512_fnmadd_ps(n, s(-2.121_944_4e-4), r);
    let mut p = s(1.987_569_2e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, s(c));
    }
    let y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), s(1.0));
    let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(ni, _mm512_set1_epi32(127)));
    let out = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
    let small = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, s(LO));
    _mm512_mask_blend_ps(small, out, _mm512_setzero_ps())
}

/// Raw scores of query `i` against keys `0 .. row.len()` (> i) into probabilities in
/// place (keys after `i` get 0); returns the row's logsumexp (+inf when no key is valid).
/// `bias` is 0 for valid keys and −inf for padded ones.
#[target_feature(enable = "avx512f")]
fn probs_row(row: &mut [f32], i: usize, bias: &[f32], scale: f32) -> f64 {
    let (x, rest) = row.split_at_mut(i + 1);
    let n = x.len();
    let sc = _mm512_set1_ps(scale);
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    for j in (0..n).step_by(16) {
        let v = _mm512_fmadd_ps(ld(x, j), sc, ld(bias, j));
        st(x, j, v);
        mx = _mm512_mask_max_ps(mx, lanes(n - j), mx, v);
    }
    let m = _mm512_reduce_max_ps(mx);
    if m == f32::NEG_INFINITY {
        row.fill(0.0);
        return f64::INFINITY;
    }
    let mv = _mm512_set1_ps(m);
    let mut acc = _mm512_setzero_ps();
    for j in (0..n).step_by(16) {
        let e = exp16(_mm512_sub_ps(ld(x, j), mv));
        st(x, j, e);
        acc = _mm512_mask_add_ps(acc, lanes(n - j), acc, e);
    }
    let total = _mm512_reduce_add_ps(acc);
    let inv = _mm512_set1_ps(1.0 / total);
    for j in (0..n).step_by(16) {
        st(x, j, _mm512_mul_ps(ld(x, j), inv));
    }
    rest.fill(0.0);
    f64::from(m) + f64::from(total).ln()
}

/// Probabilities of query `i` recomputed from raw scores and its logsumexp (as
/// [`probs_row`] leaves them).
#[target_feature(enable = "avx512f")]
fn probs_from_lse_row(row: &mut [f32], i: usize, bias: &[f32], scale: f32, lse: f64) {
    if lse.is_infinite() {
        row.fill(0.0);
        return;
    }
    let (x, rest) = row.split_at_mut(i + 1);
    let (sc, l) = (_mm512_set1_ps(scale), _mm512_set1_ps(lse as f32));
    for j in (0..x.len()).step_by(16) {
        let v = _mm512_fmadd_ps(ld(x, j), sc, ld(bias, j));
        st(x, j, exp16(_mm512_sub_ps(v, l)));
    }
    rest.fill(0.0);
}

/// dS = scale · P ⊙ (dP − Σ_j P dP) for query `i`, in place over dP (keys after `i`,
/// which dP may not hold, get 0).
#[target_feature(enable = "avx512f")]
fn softmax_grad_row(p: &[f32], dp: &mut [f32], i: usize, scale: f32) {
    let (x, rest) = dp.split_at_mut(i + 1);
    let p = &p[..x.len()];
    let mut acc = _mm512_setzero_ps();
    for j in (0..x.len()).step_by(16) {
        acc = _mm512_fmadd_ps(ld(p, j), ld(x, j), acc);
    }
    let (c, sc) = (
        _mm512_set1_ps(_mm512_reduce_add_ps(acc)),
        _mm512_set1_ps(scale),
    );
    for j in (0..x.len()).step_by(16) {
        let g = _mm512_mul_ps(ld(p, j), _mm512_sub_ps(ld(x, j), c));
        st(x, j, _mm512_mul_ps(g, sc));
    }
    rest.fill(0.0);
}

/// 0 for valid keys, −inf for padded ones.
fn key_bias(kv: Option<&[bool]>, t: usize) -> Vec<f32> {
    (0..t)
        .map(|j| match kv {
            Some(kv) if !kv[j] => f32::NEG_INFINITY,
            _ => 0.0,
        })
        .collect()
}

/// Packs the transpose of the [T, D] matrix `x` (row stride `rs`) as a right operand:
/// column j of the result (row j of `x`) in panel j / NR.
fn pack_t(x: &[f32], rs: usize, t: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; t.div_ceil(NR) * d * NR];
    for j in 0..t {
        let base = (j / NR) * d * NR + j % NR;
        for (c, v) in x[j * rs..j * rs + d].iter().enumerate() {
            out[base + c * NR] = *v;
        }
    }
    out
}

/// `dX[0 .. i1] (+)= Mᵀ · Y` for a key-side gradient (dK or dV) from the query block
/// `i0 .. i1`: `mt` is the block's [nq, ·] P or dS (row stride `ld`), `y` the block's dO
/// or Q rows. Key j only gets contributions from queries ≥ j. Rows `i0 .. i1` are
/// overwritten when `first` (this task's first query head writes them first).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
fn key_grad(
    dx: &mut MatMut<'_, f32>,
    mt: &[f32],
    ld: usize,
    y: BOp<'_>,
    (i0, i1): (usize, usize),
    d: usize,
    first: bool,
) -> Result<()> {
    let nq = i1 - i0;
    let a = AOp {
        data: mt,
        rs: 1,
        cs: ld,
    };
    product(dx.skip_rows(0)?, i0, d, nq, a, y, true, |_, _| (d, 0, nq))?;
    let a = AOp {
        data: &mt[i0..],
        ..a
    };
    product(dx.skip_rows(i0)?, nq, d, nq, a, y, !first, |r0, _| {
        (d, r0, nq)
    })
}

/// Forward of one task: kv head `g` of batch `bi` and its query heads.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(super) fn fwd_task(
    cx: &Cx<'_>,
    [q, k, v]: [&[f32]; 3],
    kv: Option<&[bool]>,
    (bi, g): (usize, usize),
    lse: &mut [f64],
    out: &SharedOut<'_, f32>,
) -> Result<()> {
    let Dims { h, hkv, t, d, .. } = cx.dm;
    let rep = h / hkv;
    let bias = key_bias(kv, t);
    let (mut kr, mut qr) = (rope_scratch(cx.rope, cx.dm), rope_scratch(cx.rope, cx.dm));
    let kpos = cx.dm.head(cx.layout, bi, g, hkv);
    let kh = load(k, kpos, cx.rope, &mut kr, d);
    let kt = pack_t(kh.data, kh.rs, t, d);
    let ktb = BOp {
        data: &kt,
        rs: NR,
        ps: d * NR,
    };
    let vb = BOp {
        data: &v[kpos.0..],
        rs: kpos.1,
        ps: NR,
    };
    let mut p = vec![0f32; QBLOCK.min(t) * t];
    for r in 0..rep {
        let (qoff, qrs) = cx.dm.head(cx.layout, bi, g * rep + r, h);
        let qh = load(q, (qoff, qrs), cx.rope, &mut qr, d);
        // SAFETY: this task is the only one that writes query head g·rep + r of batch bi.
        let mut oh = unsafe { out.at(qoff, qrs)? };
        let lse = &mut lse[r * t..(r + 1) * t];
        for i0 in (0..t).step_by(QBLOCK) {
            let (i1, nq) = ((i0 + QBLOCK).min(t), QBLOCK.min(t - i0));
            let qa = AOp {
                data: &qh.data[i0 * qh.rs..],
                rs: qh.rs,
                cs: 1,
            };
            // Scores of query i0 + r only up to key i0 + r.
            product(
                MatMut::new(&mut p, t),
                nq,
                i1,
                d,
                qa,
                ktb,
                false,
                |_, r1| (i0 + r1, 0, d),
            )?;
            for (r, row) in p.chunks_exact_mut(t).take(nq).enumerate() {
                lse[i0 + r] = probs_row(&mut row[..i1], i0 + r, &bias[..i1], cx.scale);
            }
            let pa = AOp {
                data: &p,
                rs: t,
                cs: 1,
            };
            product(oh.skip_rows(i0)?, nq, d, i1, pa, vb, false, |_, r1| {
                (d, 0, i0 + r1)
            })?;
        }
    }
    Ok(())
}

/// The backward's [`BwdSteps`] on this path: register-tiled products with causal skipping per
/// micro-tile over `[nq, T]` scratch, 16-wide softmax passes; dK/dV rows are overwritten by
/// the task's first query head (so their buffers need no zeroing). Exists only where
/// [`available`] holds, which is what makes its calls into avx512f code sound.
pub(super) struct Steps {
    scale: f32,
    t: usize,
    d: usize,
}

impl Steps {
    /// None when the CPU lacks avx512f.
    pub(super) fn new(scale: f32, dm: Dims) -> Option<Self> {
        available().then_some(Self {
            scale,
            t: dm.t,
            d: dm.d,
        })
    }

    /// A packed [T, D] transpose as a right operand.
    fn packed<'a>(&self, x: &'a [f32]) -> BOp<'a> {
        BOp {
            data: x,
            rs: NR,
            ps: self.d * NR,
        }
    }
}

/// A task's K and V heads packed transposed (for the scores and dP), K as is (for dQ), and
/// its key bias.
pub(super) struct KvPacked<'a> {
    kt: Vec<f32>,
    vt: Vec<f32>,
    k: BOp<'a>,
    bias: Vec<f32>,
}

/// A strided view as a left operand.
fn a_op(x: Mat<'_, f32>) -> AOp<'_> {
    AOp {
        data: x.data,
        rs: x.rs,
        cs: x.cs,
    }
}

/// A strided view with unit column stride as a right operand.
fn b_op(x: Mat<'_, f32>) -> BOp<'_> {
    BOp {
        data: x.data,
        rs: x.rs,
        ps: NR,
    }
}

/// Probabilities of the block's queries from raw scores (rows of stride `t`) and their
/// logsumexp `lse[r]`.
#[target_feature(enable = "avx512f")]
fn probs_block(p: &mut [f32], t: usize, b: Block, bias: &[f32], scale: f32, lse: &[f64]) {
    for (r, row) in p.chunks_exact_mut(t).take(b.nq).enumerate() {
        let i = b.i0 + r;
        probs_from_lse_row(&mut row[..b.i1], i, &bias[..b.i1], scale, lse[r]);
    }
}

/// dS of the block's queries in place over dP (rows of stride `t`).
#[target_feature(enable = "avx512f")]
fn softmax_grad_block(p: &[f32], dp: &mut [f32], t: usize, b: Block, scale: f32) {
    for (r, (pr, dr)) in p
        .chunks_exact(t)
        .zip(dp.chunks_exact_mut(t))
        .take(b.nq)
        .enumerate()
    {
        softmax_grad_row(&pr[..b.i1], &mut dr[..b.i1], b.i0 + r, scale);
    }
}

// SAFETY (every `unsafe` call in this impl): the functions called are safe apart from needing
// avx512f, which the CPU has: a `Steps` exists only where `available()` said so.
impl BwdSteps<f32> for Steps {
    type Kv<'a> = KvPacked<'a>;

    fn kv<'a>(&self, k: Mat<'a, f32>, v: Mat<'a, f32>, valid: Option<&'a [bool]>) -> KvPacked<'a> {
        KvPacked {
            kt: pack_t(k.data, k.rs, self.t, self.d),
            vt: pack_t(v.data, v.rs, self.t, self.d),
            k: b_op(k),
            bias: key_bias(valid, self.t),
        }
    }

    fn ld(&self, _b: Block, t: usize) -> usize {
        t
    }

    fn scores(&self, kv: &KvPacked<'_>, s: &mut [f32], q: Mat<'_, f32>, b: Block) -> Result<()> {
        let (t, d) = (self.t, self.d);
        let causal = |_: usize, r1: usize| (b.i0 + r1, 0, d);
        let c = MatMut::new(s, t);
        // SAFETY: avx512f (see the impl).
        unsafe {
            product(
                c,
                b.nq,
                b.i1,
                d,
                a_op(q),
                self.packed(&kv.kt),
                false,
                causal,
            )
        }
    }

    fn probs(&self, kv: &KvPacked<'_>, p: &mut [f32], b: Block, lse: &[f64]) {
        // SAFETY: avx512f (see the impl).
        unsafe { probs_block(p, self.t, b, &kv.bias, self.scale, lse) }
    }

    fn dv(
        &self,
        dv: &mut MatMut<'_, f32>,
        p: &[f32],
        go: Mat<'_, f32>,
        b: Block,
        first: bool,
    ) -> Result<()> {
        // SAFETY: avx512f (see the impl).
        unsafe { key_grad(dv, p, self.t, b_op(go), (b.i0, b.i1), self.d, first) }
    }

    fn dp(&self, kv: &KvPacked<'_>, dp: &mut [f32], go: Mat<'_, f32>, b: Block) -> Result<()> {
        let (t, d) = (self.t, self.d);
        let causal = |_: usize, r1: usize| (b.i0 + r1, 0, d);
        let c = MatMut::new(dp, t);
        // SAFETY: avx512f (see the impl).
        unsafe {
            product(
                c,
                b.nq,
                b.i1,
                d,
                a_op(go),
                self.packed(&kv.vt),
                false,
                causal,
            )
        }
    }

    fn ds(&self, p: &[f32], dp: &mut [f32], b: Block) {
        // SAFETY: avx512f (see the impl).
        unsafe { softmax_grad_block(p, dp, self.t, b, self.scale) }
    }

    fn dq(&self, kv: &KvPacked<'_>, dq: &mut MatMut<'_, f32>, ds: &[f32], b: Block) -> Result<()> {
        let (t, d) = (self.t, self.d);
        let dsa = AOp {
            data: ds,
            rs: t,
            cs: 1,
        };
        let c = dq.skip_rows(b.i0)?;
        // SAFETY: avx512f (see the impl).
        unsafe {
            product(c, b.nq, d, b.i1, dsa, kv.k, false, |_, r1| {
                (d, 0, b.i0 + r1)
            })
        }
    }

    fn dk(
        &self,
        dk: &mut MatMut<'_, f32>,
        ds: &[f32],
        q: Mat<'_, f32>,
        b: Block,
        first: bool,
    ) -> Result<()> {
        // SAFETY: avx512f (see the impl).
        unsafe { key_grad(dk, ds, self.t, b_op(q), (b.i0, b.i1), self.d, first) }
    }
}
