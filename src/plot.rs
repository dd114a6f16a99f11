//! Self-contained SVG plots (no fonts or scripts to fetch): loss curves and weight-grid heatmaps.

use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 400.0;
const PAD: f64 = 56.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart of `(x, y)` series; non-finite points are skipped.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let points = series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y1 = y0 + 1.0;
    }
    let sx = |x: f64| PAD + (x - x0) / (x1 - x0) * (W - 2.0 * PAD);
    let sy = |y: f64| H - PAD - (y - y0) / (y1 - y0) * (H - 2.0 * PAD);
    let mut svg = open_svg(title);
    let _ = write!(
        svg,
        r#"<line x1="{PAD}" y1="{0}" x2="{1}" y2="{0}" stroke="black"/><line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{0}" stroke="black"/>"#,
        H - PAD,
        W - PAD
    );
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let (xv, yv) = (x0 + f * (x1 - x0), y0 + f * (y1 - y0));
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text><text x="{}" y="{}" text-anchor="end">{}</text>"#,
            sx(xv),
            H - PAD + 16.0,
            short(xv),
            PAD - 6.0,
            sy(yv) + 4.0,
            short(yv)
        );
    }
    axis_titles(&mut svg, x_label, y_label);
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/><text x="{}" y="{}" fill="{color}">{}</text>"#,
            path.join(" "),
            W - PAD - 4.0,
            PAD + 14.0 * i as f64,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// A heatmap of `values[row][col]` (NaN = missing) with the `best` cell outlined and a small
/// note under some cells' values (`notes[row][col]`, empty or missing for none), e.g. the rung
/// where successive halving stopped a cell.
#[allow(clippy::too_many_arguments)]
pub fn heatmap(
    title: &str,
    row_label: &str,
    col_label: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<f64>],
    best: Option<(usize, usize)>,
    notes: &[Vec<String>],
) -> String {
    let finite = values.iter().flatten().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let cell_w = (W - 2.0 * PAD) / cols.len().max(1) as f64;
    let cell_h = (H - 2.0 * PAD) / rows.len().max(1) as f64;
    let mut svg = open_svg(title);
    for (r, row) in values.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            let (x, y) = (PAD + c as f64 * cell_w, PAD + r as f64 * cell_h);
            let fill = if v.is_finite() {
                let t = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
                // Low (good) values dark blue, high values pale yellow.
                let (r8, g8, b8) = (
                    (40.0 + 215.0 * t) as u8,
                    (60.0 + 180.0 * t) as u8,
                    (140.0 - 40.0 * t) as u8,
                );
                format!("rgb({r8},{g8},{b8})")
            } else {
                "#eeeeee".into()
            };
            let text = if v.is_finite() {
                format!("{v:.3}")
            } else {
                "–".into()
            };
            // White text on the dark (low) end of the scale, black on the pale end.
            let ink = if v.is_finite() && hi > lo && (v - lo) / (hi - lo) < 0.5 {
                "white"
            } else {
                "black"
            };
            let _ = write!(
                svg,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{cell_w:.1}" height="{cell_h:.1}" fill="{fill}" stroke="white"/><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="{ink}">{text}</text>"#,
                x + cell_w / 2.0,
                y + cell_h / 2.0 + 4.0
            );
            if let Some(note) = notes
                .get(r)
                .and_then(|n| n.get(c))
                .filter(|n| !n.is_empty())
            {
                let _ = write!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9" fill="{ink}">{}</text>"#,
                    x + cell_w / 2.0,
                    y + cell_h / 2.0 + 16.0,
                    escape(note)
                );
            }
        }
    }
    if let Some((r, c)) = best {
        let _ = write!(
            svg,
            r#"<rect x="{:.1}" y="{:.1}" width="{cell_w:.1}" height="{cell_h:.1}" fill="none" stroke="red" stroke-width="3"/>"#,
            PAD + c as f64 * cell_w,
            PAD + r as f64 * cell_h
        );
    }
    for (c, name) in cols.iter().enumerate() {
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            PAD + (c as f64 + 0.5) * cell_w,
            H - PAD + 16.0,
            escape(name)
        );
    }
    for (r, name) in rows.iter().enumerate() {
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            PAD - 6.0,
            PAD + (r as f64 + 0.5) * cell_h + 4.0,
            escape(name)
        );
    }
    axis_titles(&mut svg, col_label, row_label);
    svg.push_str("</svg>\n");
    svg
}

/// An SVG document of the plot size, white background, `title` centred on top (left open).
fn open_svg(title: &str) -> String {
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    svg
}

/// The x-axis title under the plot and the y-axis title turned along the left edge.
fn axis_titles(svg: &mut String, x_label: &str, y_label: &str) {
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text><text x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">{}</text>"#,
        W / 2.0,
        H - 12.0,
        escape(x_label),
        H / 2.0,
        H / 2.0,
        escape(y_label)
    );
}

fn short(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}
