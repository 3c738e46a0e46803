//! The rate–accuracy plot: accuracy against size on disk (log scale), one series per method
//! family, the fp32 point marked, as SVG and PNG (plotters; text in the bundled Aileron font, CC0,
//! so that no system font is needed).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::Row;

/// Aileron Regular (dotcolon.net, CC0), the subset Pillow embeds as its default font.
const FONT: &[u8] = include_bytes!("../../../assets/fonts/Aileron-Regular.ttf");

const FAMILIES: &[(&str, RGBColor)] = &[
    ("fp32", RGBColor(0, 0, 0)),
    ("post-training", RGBColor(214, 39, 40)),
    ("post-training (histogram)", RGBColor(255, 127, 14)),
    ("QAT", RGBColor(31, 119, 180)),
    ("Quant-Noise", RGBColor(44, 160, 44)),
    ("Quant-Noise + int8 centroids", RGBColor(148, 103, 189)),
    ("post-training + KD", RGBColor(140, 86, 75)),
    ("Quant-Noise + KD", RGBColor(23, 190, 207)),
    ("post-training, budget", RGBColor(227, 119, 194)),
    ("post-training + KD, budget", RGBColor(127, 127, 127)),
    ("Quant-Noise + KD, budget", RGBColor(188, 189, 34)),
];

/// A plotted point: size in MB, accuracy in %, its label.
struct Point {
    mb: f64,
    acc: f64,
    label: String,
}

/// Draws `rows` (those with a size and an accuracy) to `svg` and `png`.
pub fn draw(title: &str, rows: &[Row], svg: &Path, png: &Path) -> Result<()> {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    let mut registered = Ok(());
    REGISTER.call_once(|| {
        registered = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| anyhow!("the bundled plot font does not parse"));
    });
    registered?;
    let series: Vec<(&str, RGBColor, Vec<Point>)> = FAMILIES
        .iter()
        .map(|(family, color)| {
            let mut pts: Vec<Point> = rows
                .iter()
                .filter(|r| r.method.family == *family)
                .filter_map(|r| {
                    Some(Point {
                        mb: r.bytes? as f64 / 1e6,
                        acc: r.accuracy? * 100.0,
                        label: r.method.label.to_string(),
                    })
                })
                .collect();
            pts.sort_by(|a, b| a.mb.total_cmp(&b.mb));
            (*family, *color, pts)
        })
        .filter(|(_, _, pts)| !pts.is_empty())
        .collect();
    if series.is_empty() {
        return Err(anyhow!(
            "nothing to plot: no row has both a size and an accuracy"
        ));
    }
    let size = (1000, 640);
    draw_on(
        SVGBackend::new(svg, size).into_drawing_area(),
        title,
        &series,
    )?;
    draw_on(
        BitMapBackend::new(png, size).into_drawing_area(),
        title,
        &series,
    )?;
    Ok(())
}

fn draw_on<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    series: &[(&str, RGBColor, Vec<Point>)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the plot: {e}");
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 24)).map_err(err)?;
    // The legend gets its own column, so that it never hides a point.
    let (plot_area, legend_area) = root.split_horizontally(root.dim_in_pixel().0 - 250);
    let all = series.iter().flat_map(|(_, _, p)| p);
    let (mut lo_mb, mut hi_mb, mut lo_acc, mut hi_acc) =
        (f64::INFINITY, 0.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for p in all {
        lo_mb = lo_mb.min(p.mb);
        hi_mb = hi_mb.max(p.mb);
        lo_acc = lo_acc.min(p.acc);
        hi_acc = hi_acc.max(p.acc);
    }
    let pad = ((hi_acc - lo_acc) * 0.08).max(1.0);
    let mut chart = ChartBuilder::on(&plot_area)
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (lo_mb / 1.6..hi_mb * 1.6).log_scale(),
            (lo_acc - pad)..(hi_acc + pad),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("size on disk (MB, log scale)")
        .y_desc("accuracy (%)")
        .x_labels(8)
        .x_label_formatter(&|x| {
            if *x >= 10.0 {
                format!("{x:.0}")
            } else if *x >= 1.0 {
                format!("{x:.1}")
            } else {
                format!("{x:.2}")
            }
        })
        .y_label_formatter(&|y| format!("{y:.1}"))
        .light_line_style(RGBColor(245, 245, 245))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(err)?;
    for (family, color, pts) in series {
        let color = *color;
        let is_fp32 = *family == "fp32";
        if pts.len() > 1 {
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|p| (p.mb, p.acc)),
                    color.mix(0.5).stroke_width(1),
                ))
                .map_err(err)?;
        }
        let radius = if is_fp32 { 8 } else { 5 };
        chart
            .draw_series(pts.iter().map(|p| {
                EmptyElement::at((p.mb, p.acc))
                    + Circle::new((0, 0), radius, color.filled())
                    + Text::new(
                        p.label.clone(),
                        (8, -16),
                        ("sans-serif", 13).into_font().color(&color),
                    )
            }))
            .map_err(err)?;
    }
    for (i, (family, color, _)) in series.iter().enumerate() {
        let y = 60 + 28 * i as i32;
        legend_area
            .draw(&Circle::new((12, y), 6, color.filled()))
            .map_err(err)?;
        legend_area
            .draw(&Text::new(
                family.to_string(),
                (26, y - 8),
                ("sans-serif", 15).into_font(),
            ))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_family_has_a_colour() {
        for m in crate::bench::suite::METHODS {
            assert!(
                super::FAMILIES.iter().any(|(f, _)| *f == m.family),
                "{} ({}) would not be drawn",
                m.family,
                m.id
            );
        }
    }
}
