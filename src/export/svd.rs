//! A small dense SVD in f64 (one-sided Jacobi), and the truncated re-factorisation of a low-rank
//! product `B·A` that the `svd` adapter combination needs.
//!
//! One-sided Jacobi is slow for big matrices but simple and accurate to the last digits; it is
//! only ever run on a small core here: `B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ` after two thin QRs, so a
//! 1536×576 ΔW of rank 32 costs a 32×32 SVD.

/// `M = U·diag(s)·Vᵀ`, singular values descending. `u` and `v` hold columns.
#[derive(Debug, Clone)]
pub struct Svd {
    pub u: Vec<Vec<f64>>,
    pub s: Vec<f64>,
    pub v: Vec<Vec<f64>>,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Thin SVD of a row-major `rows × cols` matrix.
pub fn svd(m: &[f64], rows: usize, cols: usize) -> Svd {
    assert_eq!(m.len(), rows * cols, "svd: matrix size");
    if rows < cols {
        // Work on the transpose so the rotated columns are the longer side.
        let mut t = vec![0.0; m.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = m[r * cols + c];
            }
        }
        let Svd { u, s, v } = svd(&t, cols, rows);
        return Svd { u: v, s, v: u };
    }
    // g: the columns of M, rotated until mutually orthogonal; v accumulates the rotations.
    let mut g: Vec<Vec<f64>> = (0..cols)
        .map(|c| (0..rows).map(|r| m[r * cols + c]).collect())
        .collect();
    let mut v: Vec<Vec<f64>> = (0..cols)
        .map(|c| (0..cols).map(|r| if r == c { 1.0 } else { 0.0 }).collect())
        .collect();
    let eps = 1e-15;
    for _sweep in 0..60 {
        let mut rotated = false;
        for i in 0..cols {
            for j in i + 1..cols {
                let alpha = dot(&g[i], &g[i]);
                let beta = dot(&g[j], &g[j]);
                let gamma = dot(&g[i], &g[j]);
                if gamma == 0.0 || gamma.abs() <= eps * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                rotate(&mut g, i, j, c, s);
                rotate(&mut v, i, j, c, s);
            }
        }
        if !rotated {
            break;
        }
    }
    let mut order: Vec<(f64, usize)> = g
        .iter()
        .enumerate()
        .map(|(k, col)| (dot(col, col).sqrt(), k))
        .collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut out = Svd {
        u: Vec::with_capacity(cols),
        s: Vec::with_capacity(cols),
        v: Vec::with_capacity(cols),
    };
    for (sigma, k) in order {
        let u = if sigma > 0.0 {
            g[k].iter().map(|x| x / sigma).collect()
        } else {
            vec![0.0; rows]
        };
        out.u.push(u);
        out.s.push(sigma);
        out.v.push(v[k].clone());
    }
    out
}

fn rotate(cols: &mut [Vec<f64>], i: usize, j: usize, c: f64, s: f64) {
    let (left, right) = cols.split_at_mut(j);
    let (a, b) = (&mut left[i], &mut right[0]);
    for (x, y) in a.iter_mut().zip(b.iter_mut()) {
        let (xi, yj) = (*x, *y);
        *x = c * xi - s * yj;
        *y = s * xi + c * yj;
    }
}

/// Thin QR by modified Gram–Schmidt with one re-orthogonalisation pass. `cols` are the columns
/// of the input; returns the columns of Q and R row-major (`k × k`). Dependent columns get a
/// zero Q column and a zero diagonal.
pub fn qr(cols: &[Vec<f64>]) -> (Vec<Vec<f64>>, Vec<f64>) {
    let k = cols.len();
    let scale = cols.iter().map(|c| dot(c, c).sqrt()).fold(0.0, f64::max);
    let mut q: Vec<Vec<f64>> = Vec::with_capacity(k);
    let mut r = vec![0.0; k * k];
    for (j, col) in cols.iter().enumerate() {
        let mut w = col.clone();
        for _pass in 0..2 {
            for (i, qi) in q.iter().enumerate() {
                let d = dot(qi, &w);
                r[i * k + j] += d;
                for (x, y) in w.iter_mut().zip(qi) {
                    *x -= d * y;
                }
            }
        }
        let norm = dot(&w, &w).sqrt();
        if norm > 1e-13 * scale && norm > 0.0 {
            r[j * k + j] = norm;
            q.push(w.iter().map(|x| x / norm).collect());
        } else {
            q.push(vec![0.0; w.len()]);
        }
    }
    (q, r)
}

/// Best rank-`rank` factors of `B·A` (B: `out × k` row-major, A: `k × inp` row-major), as
/// `(B', A')` with `B'·A' ≈ B·A` and the singular values split evenly between them.
/// Also returns all singular values of `B·A`, for reporting what the truncation dropped.
pub fn truncate_product(
    b: &[f64],
    a: &[f64],
    out: usize,
    k: usize,
    inp: usize,
    rank: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let b_cols: Vec<Vec<f64>> = (0..k)
        .map(|c| (0..out).map(|r| b[r * k + c]).collect())
        .collect();
    let a_rows: Vec<Vec<f64>> = (0..k).map(|r| a[r * inp..(r + 1) * inp].to_vec()).collect();
    let (qb, rb) = qr(&b_cols);
    let (qa, ra) = qr(&a_rows);
    // core = R_B · R_Aᵀ, so B·A = Q_B · core · Q_Aᵀ.
    let mut core = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..k {
            core[i * k + j] = (0..k).map(|t| rb[i * k + t] * ra[j * k + t]).sum();
        }
    }
    let small = svd(&core, k, k);
    let mut new_b = vec![0.0; out * rank];
    let mut new_a = vec![0.0; rank * inp];
    for c in 0..rank.min(k) {
        let root = small.s[c].sqrt();
        for (row, value) in new_b.chunks_mut(rank).enumerate().take(out) {
            let u: f64 = (0..k).map(|t| qb[t][row] * small.u[c][t]).sum();
            value[c] = u * root;
        }
        for col in 0..inp {
            let v: f64 = (0..k).map(|t| qa[t][col] * small.v[c][t]).sum();
            new_a[c * inp + col] = v * root;
        }
    }
    (new_b, new_a, small.s)
}
