//! Minimal SVG line charts (TTFT/TPOT CDFs, throughput and latency against request rate).
//!
//! Written by hand instead of with `plotters`: a few dozen lines of SVG keep the simulator's build
//! free of a plotting stack, and the output is deterministic text, diffable like the JSON.

/// One named line: points (x, y) in data units.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const W: f64 = 640.0;
const H: f64 = 400.0;
/// Margins: left for y tick labels, bottom for x tick labels.
const ML: f64 = 70.0;
const MR: f64 = 20.0;
const MT: f64 = 40.0;
const MB: f64 = 50.0;
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart as an SVG document. Empty or degenerate data gives an empty frame.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let pts = series.iter().flat_map(|s| &s.points);
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if !(x0.is_finite() && x1 > x0) {
        (x0, x1) = (0.0, 1.0);
    }
    let y0 = 0.0;
    if !(y1.is_finite() && y1 > y0) {
        y1 = 1.0;
    }
    let px = |x: f64| ML + (x - x0) / (x1 - x0) * (W - ML - MR);
    let py = |y: f64| H - MB - (y - y0) / (y1 - y0) * (H - MT - MB);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        W / 2.0,
        esc(title)
    );
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let (xv, yv) = (x0 + f * (x1 - x0), y0 + f * (y1 - y0));
        s += &format!(
            "<line x1=\"{a:.1}\" y1=\"{t}\" x2=\"{a:.1}\" y2=\"{b}\" stroke=\"#ddd\"/>\
             <text x=\"{a:.1}\" y=\"{ty}\" text-anchor=\"middle\">{xv:.3}</text>\n",
            a = px(xv),
            t = MT,
            b = H - MB,
            ty = H - MB + 16.0
        );
        s += &format!(
            "<line x1=\"{l}\" y1=\"{a:.1}\" x2=\"{r}\" y2=\"{a:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{tx}\" y=\"{a:.1}\" text-anchor=\"end\" dy=\"4\">{yv:.3}</text>\n",
            a = py(yv),
            l = ML,
            r = W - MR,
            tx = ML - 6.0
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
         <text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">{}</text>\n",
        (ML + W - MR) / 2.0,
        H - 12.0,
        esc(x_label),
        (MT + H - MB) / 2.0,
        (MT + H - MB) / 2.0,
        esc(y_label)
    );
    for (i, ser) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = ser
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n\
             <text x=\"{}\" y=\"{}\" fill=\"{colour}\">{}</text>\n",
            path.join(" "),
            ML + 10.0,
            MT + 14.0 + 16.0 * i as f64,
            esc(&ser.name)
        );
    }
    s + "</svg>\n"
}

/// The empirical CDF of sorted values, thinned to at most `POINTS_MAX` points.
pub fn cdf(sorted: &[f64]) -> Vec<(f64, f64)> {
    // 400 points: finer than the 640-pixel plot can show.
    const POINTS_MAX: usize = 400;
    let n = sorted.len();
    let step = n.div_ceil(POINTS_MAX).max(1);
    (0..n)
        .step_by(step)
        .chain(n.checked_sub(1))
        .map(|i| (sorted[i], (i + 1) as f64 / n as f64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders() {
        let s = line_chart(
            "t<1>",
            "x",
            "y",
            &[Series {
                name: "a".into(),
                points: cdf(&[1.0, 2.0, 3.0]),
            }],
        );
        assert!(s.starts_with("<svg") && s.contains("polyline") && s.contains("t&lt;1&gt;"));
        assert!(line_chart("e", "x", "y", &[]).contains("</svg>"));
    }
}
