//! Line charts of a simulation (TTFT/TPOT CDFs, throughput and latency against request rate), drawn
//! with `plotters` as SVG and PNG.
//!
//! The PNG needs a font rasteriser: plotters' `ab_glyph` backend with DejaVu Sans compiled in, so that
//! rendering depends on no system font library (`cargo build` needs no system package) and the same
//! input gives the same bytes on every machine.

use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::SimError;

/// One named line: points (x, y) in data units.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A chart: what `line_chart_svg` and `line_chart_png` draw.
#[derive(Debug, Clone, Copy)]
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a [Series],
}

/// Pixels; the SVG's nominal size too.
const SIZE: (u32, u32) = (800, 500);
const FONT: &str = "sans-serif";
const COLOURS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// Registers the embedded font once; every text element is drawn in it.
fn font() -> Result<(), SimError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok());
    if ok {
        Ok(())
    } else {
        Err(SimError::Chart(
            "the embedded DejaVu Sans font failed to load".into(),
        ))
    }
}

/// The chart as an SVG document.
pub fn line_chart_svg(chart: Chart<'_>) -> Result<String, SimError> {
    font()?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw(&root, chart).map_err(chart_error)?;
    }
    Ok(svg)
}

/// The chart as a PNG image (8-bit RGB).
pub fn line_chart_png(chart: Chart<'_>) -> Result<Vec<u8>, SimError> {
    let rgb = line_chart_rgb(chart)?;
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, SIZE.0, SIZE.1);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let png_error = |e: png::EncodingError| SimError::Chart(format!("encoding PNG: {e}"));
    let mut w = enc.write_header().map_err(png_error)?;
    w.write_image_data(&rgb).map_err(png_error)?;
    w.finish().map_err(png_error)?;
    Ok(out)
}

/// The chart's pixels, row by row, 3 bytes each.
fn line_chart_rgb(chart: Chart<'_>) -> Result<Vec<u8>, SimError> {
    font()?;
    let mut rgb = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        draw(&root, chart).map_err(chart_error)?;
    }
    Ok(rgb)
}

fn chart_error<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> SimError {
    SimError::Chart(e.to_string())
}

/// Axis ranges covering every finite point; a degenerate range is widened so that an empty or
/// one-point series still draws a frame. The y axis starts at 0: rates and latencies are compared
/// against nothing.
fn ranges(series: &[Series]) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY);
    let finite = series
        .iter()
        .flat_map(|s| &s.points)
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    for &(x, y) in finite {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    } else if x1 <= x0 {
        (x0, x1) = (x0 - 0.5, x1 + 0.5);
    }
    if !(y1.is_finite() && y1 > 0.0) {
        y1 = 1.0;
    }
    (x0..x1, 0.0..y1 * 1.05)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: Chart<'_>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let (xs, ys) = ranges(chart.series);
    let mut c = ChartBuilder::on(root)
        .caption(chart.title, (FONT, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(xs, ys)?;
    c.configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()?;
    for (i, s) in chart.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite());
        c.draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    if !chart.series.is_empty() {
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()
}

/// The empirical CDF of sorted values, thinned to at most `POINTS_MAX` points.
pub fn cdf(sorted: &[f64]) -> Vec<(f64, f64)> {
    // 400 points: finer than the 800-pixel plot can show.
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

    fn latency() -> Vec<Series> {
        vec![
            Series {
                name: "TTFT p99".into(),
                points: vec![(1.0, 10.0), (2.0, 30.0), (3.0, 20.0)],
            },
            Series {
                name: "TPOT p99".into(),
                points: vec![(1.0, 5.0), (2.0, 6.0), (3.0, f64::NAN)],
            },
        ]
    }

    fn chart(series: &[Series]) -> Chart<'_> {
        Chart {
            title: "Latency <against> rate",
            x_label: "requests/s",
            y_label: "ms",
            series,
        }
    }

    #[test]
    fn svg_has_title_axes_legend_and_lines() {
        let s = line_chart_svg(chart(&latency())).unwrap();
        assert!(s.starts_with("<svg"), "{}", &s[..80]);
        for text in [
            "Latency &lt;against&gt; rate",
            "requests/s",
            "TTFT p99",
            "TPOT p99",
        ] {
            assert!(s.contains(text), "{text} missing");
        }
        // One line per series, in its own colour.
        assert!(s.contains("#1F77B4") || s.contains("#1f77b4"));
        assert!(s.contains("#D62728") || s.contains("#d62728"));
    }

    #[test]
    fn png_is_a_picture_with_text_and_lines() {
        let bytes = line_chart_png(chart(&latency())).unwrap();
        let dec = png::Decoder::new(std::io::Cursor::new(&bytes));
        let mut reader = dec.read_info().unwrap();
        let mut rgb = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut rgb).unwrap();
        assert_eq!((info.width, info.height), SIZE);
        let px = |x: u32, y: u32| {
            let i = (y * SIZE.0 + x) as usize * 3;
            (rgb[i], rgb[i + 1], rgb[i + 2])
        };
        // The title is rasterised: dark pixels in the band above the plot.
        let title_ink = (0..40)
            .flat_map(|y| (0..SIZE.0).map(move |x| (x, y)))
            .filter(|&(x, y)| px(x, y).0 < 128)
            .count();
        assert!(title_ink > 50, "{title_ink} dark pixels in the title band");
        // Both series are drawn in their colours.
        for c in &COLOURS[..2] {
            let n = (0..SIZE.1)
                .flat_map(|y| (0..SIZE.0).map(move |x| (x, y)))
                .filter(|&(x, y)| px(x, y) == (c.0, c.1, c.2))
                .count();
            assert!(n > 100, "{n} pixels of {c:?}");
        }
        // Same input, same bytes.
        assert_eq!(bytes, line_chart_png(chart(&latency())).unwrap());
    }

    #[test]
    fn empty_and_degenerate_series_still_draw_a_frame() {
        assert!(line_chart_svg(chart(&[])).unwrap().contains("requests/s"));
        let one = [Series {
            name: "one".into(),
            points: vec![(4.0, 0.0)],
        }];
        assert!(line_chart_png(chart(&one)).is_ok());
        let (xs, ys) = ranges(&one);
        assert!(xs.end > xs.start && ys.end > ys.start);
    }

    #[test]
    fn cdf_is_thinned_and_ends_at_one() {
        let v: Vec<f64> = (0..10_000).map(f64::from).collect();
        let c = cdf(&v);
        assert!(c.len() <= 401);
        assert_eq!(c.last(), Some(&(9999.0, 1.0)));
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert!(cdf(&[]).is_empty());
    }
}
