//! Medians, quartiles, paired differences and a least-squares line. Samples are milliseconds
//! (`f64`); a missing sample (a failed run) is `NaN` and is left out.

/// The `q`-quantile (0..=1) of the finite samples, linear interpolation; `NaN` if there are none.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // 0 <= pos < len
pub fn quantile(samples: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

pub fn median(samples: &[f64]) -> f64 {
    quantile(samples, 0.5)
}

/// Median and interquartile range of a sample set.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: f64,
    pub p25: f64,
    pub p75: f64,
}

pub fn summary(samples: &[f64]) -> Summary {
    Summary { median: median(samples), p25: quantile(samples, 0.25), p75: quantile(samples, 0.75) }
}

/// A distribution-free ~95% confidence interval of the median (order statistics of the binomial
/// distribution, normal approximation): `(low, high)`, NaN with fewer than 6 samples.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // 0 <= k < n
pub fn median_ci(samples: &[f64]) -> (f64, f64) {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.len() < 6 {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let k = (n / 2.0 - 0.98 * n.sqrt()).floor().max(0.0) as usize;
    (v[k], v[v.len() - 1 - k])
}

/// `median [95% CI low..high]`, signed.
pub fn signed_with_ci(samples: &[f64]) -> String {
    let (lo, hi) = median_ci(samples);
    format!("{} [95% CI {}..{}]", signed_ms(median(samples)), signed_ms(lo), signed_ms(hi))
}

/// Per-round differences `a[i] - b[i]` (rounds where either is missing are left out).
pub fn paired_diff(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).filter(|d| d.is_finite()).collect()
}

/// Least-squares line `y = intercept + slope * x`, with R².
#[derive(Debug, Clone, Copy)]
pub struct Fit {
    pub slope: f64,
    pub intercept: f64,
    pub r2: f64,
}

pub fn fit(points: &[(f64, f64)]) -> Fit {
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let syy: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    let slope = sxy / sxx;
    let intercept = my - slope * mx;
    let ss_res: f64 = points.iter().map(|p| (p.1 - intercept - slope * p.0).powi(2)).sum();
    let r2 = if syy > 0.0 { 1.0 - ss_res / syy } else { 1.0 };
    Fit { slope, intercept, r2 }
}

/// `12.3` style milliseconds (2 decimals under 10 ms, 1 above).
pub fn ms(x: f64) -> String {
    if !x.is_finite() {
        "n/a".into()
    } else if x.abs() < 10.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.1}")
    }
}

/// Signed milliseconds: `+1.23`, `-0.40`.
pub fn signed_ms(x: f64) -> String {
    if !x.is_finite() {
        "n/a".into()
    } else if x >= 0.0 {
        format!("+{}", ms(x))
    } else {
        format!("-{}", ms(-x))
    }
}

/// `median (p25..p75)` of a sample set, signed.
pub fn signed_with_iqr(s: &Summary) -> String {
    format!("{} ({}..{})", signed_ms(s.median), signed_ms(s.p25), signed_ms(s.p75))
}

pub fn with_iqr(s: &Summary) -> String {
    format!("{} ({}..{})", ms(s.median), ms(s.p25), ms(s.p75))
}

/// KiB as MiB with 2 decimals.
pub fn mib(kib: f64) -> String {
    format!("{:.2} MiB", kib / 1024.0)
}
