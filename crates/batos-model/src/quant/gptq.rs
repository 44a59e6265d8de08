//! GPTQ-style error compensation (Frantar et al. 2022) for one linear layer, on the
//! CPU: quantise the input columns in order and spread each column's rounding error
//! over the columns not yet quantised, weighted by the inverse of the layer's input
//! Hessian `H = XᵀX / T`, so that the layer's *output* error on the calibration inputs
//! stays small even where single weights move further.
//!
//! Group parameters (scale, integer zero point) are chosen when the loop reaches a
//! group's first column, from the weights as the compensation has left them, so the
//! result is plain AutoAWQ int4 (no activation reordering).

use batos_kernels::{cpu, WeightView};
use rayon::prelude::*;

use super::error::QuantError;
use super::int4::GroupParams;

/// The factor GPTQ walks with: `U` upper triangular with `H⁻¹ = UᵀU`, row-major
/// `[n, n]`, f32.
pub(crate) struct InverseFactor {
    n: usize,
    u: Vec<f32>,
}

/// Dot product with several accumulators (lets the compiler vectorise a sum it may
/// not reorder).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f64>() + tail
}

impl InverseFactor {
    /// Factors `h` (`[n, n]`, symmetric positive semi-definite) after adding
    /// `damp · mean(diag h)` to its diagonal (and 1 to any zero diagonal entry: an input
    /// channel never excited). The damping doubles, up to four times, if the matrix is
    /// still not positive definite; then it is a typed error.
    pub(crate) fn new(name: &str, h: &[f64], n: usize, damp: f64) -> Result<Self, QuantError> {
        let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n.max(1) as f64;
        let mut d = damp * mean.max(f64::MIN_POSITIVE);
        for _ in 0..5 {
            if let Some(l) = Self::reversed_cholesky(h, n, d) {
                return Ok(InverseFactor {
                    n,
                    u: Self::upper_from_reversed(&l, n),
                });
            }
            d *= 2.0;
        }
        Err(QuantError::Calibration {
            reason: format!(
                "{name}: the input Hessian ({n}x{n}) is not positive definite even with damping {d:.3e}"
            ),
        })
    }

    /// Lower Cholesky factor `L` of `J·(H + dI)·J` (`J` reverses the index order), or
    /// `None` if a pivot is not positive.
    fn reversed_cholesky(h: &[f64], n: usize, damp: f64) -> Option<Vec<f64>> {
        let mut l = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                let (ri, rj) = (n - 1 - i, n - 1 - j);
                let mut a = h[ri * n + rj];
                if i == j {
                    a += if h[ri * n + ri] == 0.0 { 1.0 } else { damp };
                }
                let s = a - dot(&l[i * n..i * n + j], &l[j * n..j * n + j]);
                if i == j {
                    if !(s > 0.0 && s.is_finite()) {
                        return None;
                    }
                    l[i * n + i] = s.sqrt();
                } else {
                    l[i * n + j] = s / l[j * n + j];
                }
            }
        }
        Some(l)
    }

    /// With `J(H + dI)J = LLᵀ`, `H + dI = VVᵀ` for the upper `V = JLJ`, so
    /// `(H + dI)⁻¹ = UᵀU` with `U = V⁻¹ = J·L⁻¹·J`. Inverts `L` column by column.
    fn upper_from_reversed(l: &[f64], n: usize) -> Vec<f32> {
        // Columns of L⁻¹ are independent: X·e_j solved by forward substitution.
        let cols: Vec<Vec<f64>> = (0..n)
            .into_par_iter()
            .map(|j| {
                let mut x = vec![0f64; n];
                x[j] = 1.0 / l[j * n + j];
                for i in j + 1..n {
                    let s = dot(&l[i * n + j..i * n + i], &x[j..i]);
                    x[i] = -s / l[i * n + i];
                }
                x
            })
            .collect();
        let mut u = vec![0f32; n * n];
        for (j, col) in cols.iter().enumerate() {
            for (i, &v) in col.iter().enumerate().skip(j) {
                // (L⁻¹)[i, j] lands at U[n-1-i, n-1-j], upper since n-1-i ≤ n-1-j.
                u[(n - 1 - i) * n + (n - 1 - j)] = v as f32;
            }
        }
        u
    }
}

/// The input Hessian `XᵀX / T` of `x` (`[T, cols]`), through the f32 matmul kernel
/// (`Xᵀ` times itself), widened to f64 for the factorisation.
pub(crate) fn hessian(x: &[f32], cols: usize) -> Result<Vec<f64>, QuantError> {
    let t = x.len() / cols;
    let mut xt = vec![0f32; x.len()];
    for (ti, row) in x.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            xt[c * t + ti] = v;
        }
    }
    let kern = |source| QuantError::Kernel {
        op: "gptq hessian",
        source,
    };
    let view = WeightView::f32(&xt, cols, t).map_err(kern)?;
    let mut h = vec![0f32; cols * cols];
    cpu::matmul(&xt, &view, &mut h).map_err(kern)?;
    let inv_t = 1.0 / t.max(1) as f64;
    Ok(h.into_iter().map(|v| f64::from(v) * inv_t).collect())
}

/// GPTQ over `w` (`[rows, cols]`, row-major): returns per (row, group) parameters and
/// the quantised values (each exactly `(q − z)·s` for its group), row-major.
/// `choose(group_weights, group_start)` picks a group's parameters.
pub(crate) fn gptq<F>(
    w: &[f32],
    cols: usize,
    group: usize,
    factor: &InverseFactor,
    choose: F,
) -> (Vec<GroupParams>, Vec<f32>)
where
    F: Fn(&[f32], usize) -> GroupParams + Sync,
{
    debug_assert_eq!(factor.n, cols);
    let u = &factor.u;
    let per_row: Vec<(Vec<GroupParams>, Vec<f32>)> = w
        .par_chunks(cols)
        .map(|row| {
            let mut w = row.to_vec();
            let mut out = vec![0f32; cols];
            let mut params = Vec::with_capacity(cols / group);
            for g0 in (0..cols).step_by(group) {
                let p = choose(&w[g0..g0 + group], g0);
                params.push(p);
                for i in g0..g0 + group {
                    let q = p.dequant(p.code(w[i]));
                    out[i] = q;
                    let e = (w[i] - q) / u[i * cols + i];
                    let (_, rest) = w.split_at_mut(i + 1);
                    for (wj, &uj) in rest.iter_mut().zip(&u[i * cols + i + 1..(i + 1) * cols]) {
                        *wj -= e * uj;
                    }
                }
            }
            (params, out)
        })
        .collect();
    let mut params = Vec::with_capacity(w.len() / group);
    let mut values = Vec::with_capacity(w.len());
    for (p, v) in per_row {
        params.extend(p);
        values.extend(v);
    }
    (params, values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::int4::group_params;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn factor_inverts_the_damped_hessian() {
        let (n, t) = (13, 40);
        let mut seed = 7;
        let x: Vec<f32> = (0..n * t).map(|_| lcg(&mut seed)).collect();
        let h = hessian(&x, n).unwrap();
        let f = InverseFactor::new("test", &h, n, 0.01).unwrap();
        let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
        // (H + dI)·UᵀU = I.
        for i in 0..n {
            for j in 0..n {
                let mut s = 0f64;
                for k in 0..n {
                    let hk = h[i * n + k] + if i == k { 0.01 * mean } else { 0.0 };
                    let utu: f64 = (0..n)
                        .map(|m| f64::from(f.u[m * n + k]) * f64::from(f.u[m * n + j]))
                        .sum();
                    s += hk * utu;
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((s - want).abs() < 1e-4, "({i},{j}): {s}");
            }
        }
        // Upper triangular.
        for i in 0..n {
            for j in 0..i {
                assert_eq!(f.u[i * n + j], 0.0);
            }
        }
    }

    #[test]
    fn gptq_lowers_output_error_against_round_to_nearest() {
        let (rows, cols, group, t) = (16, 64, 16, 256);
        let mut seed = 11;
        // Correlated inputs: a shared component plus noise.
        let x: Vec<f32> = (0..t)
            .flat_map(|_| {
                let c = lcg(&mut seed);
                (0..cols)
                    .map(|_| c + 0.3 * lcg(&mut seed))
                    .collect::<Vec<_>>()
            })
            .collect();
        let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
        let h = hessian(&x, cols).unwrap();
        let f = InverseFactor::new("test", &h, cols, 0.01).unwrap();
        let (params, q) = gptq(&w, cols, group, &f, |wg, _| group_params(wg, None));
        let mut rtn = vec![0f32; w.len()];
        crate::quant::int4::fake_quantize(&w, cols, group, None, &mut rtn);
        let err = |q: &[f32]| -> f64 {
            let mut e = 0f64;
            for xr in x.chunks_exact(cols) {
                for (wr, qr) in w.chunks_exact(cols).zip(q.chunks_exact(cols)) {
                    let d: f32 = xr
                        .iter()
                        .zip(wr.iter().zip(qr))
                        .map(|(a, (b, c))| a * (b - c))
                        .sum();
                    e += f64::from(d * d);
                }
            }
            e
        };
        let (eg, er) = (err(&q), err(&rtn));
        assert!(eg < 0.8 * er, "gptq {eg} vs rtn {er}");
        // Every value sits on its group's grid.
        for (i, &v) in q.iter().enumerate() {
            let p = params[i / group];
            assert_eq!(p.dequant(p.code(v)), v, "value {i}");
        }
    }
}
