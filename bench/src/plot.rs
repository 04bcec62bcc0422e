//! SVG plots of `latest.json` (plotters, SVG backend only).

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

const PATHS: [&str; 5] = ["direct", "envoy_baseline", "envoy_hbone", "keyway_same_zone", "keyway_cross_zone"];
const QS: [(&str, &str); 4] = [("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("p999_ms", "p99.9")];
const COLORS: [RGBColor; 5] = [
    RGBColor(90, 90, 90),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(214, 39, 40),
];

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

/// Latency percentiles of every path, one line per path.
pub fn latency(v: &Value, key: &str, title: &str, out: &Path) -> anyhow::Result<()> {
    let data = &v["latency"][key];
    let max = PATHS
        .iter()
        .flat_map(|p| QS.iter().map(move |(q, _)| data[p][q].as_f64().unwrap_or(0.0)))
        .fold(0.0, f64::max)
        .max(0.1);
    let root = SVGBackend::new(out, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.2f64..3.2f64, 0f64..max * 1.1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(4)
        .x_label_formatter(&|x| QS.get(x.round() as usize).map(|q| q.1.to_owned()).unwrap_or_default())
        .y_desc("latency (ms)")
        .draw()
        .map_err(err)?;
    for (i, p) in PATHS.iter().enumerate() {
        let pts: Vec<(f64, f64)> =
            QS.iter().enumerate().filter_map(|(j, (q, _))| data[p][q].as_f64().map(|y| (j as f64, y))).collect();
        let c = COLORS[i];
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(err)?
            .label(*p)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 3, c.filled()))).map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Throughput of each path, one flow and eight flows side by side.
pub fn throughput(v: &Value, out: &Path) -> anyhow::Result<()> {
    let t = &v["throughput"];
    let rows = [
        ("direct", "direct"),
        ("envoy_hbone", "envoy_hbone"),
        ("keyway", "keyway_cross_zone"),
        ("boringtun", "boringtun"),
        ("agent", "agent"),
    ];
    let val = |k: &str, eight: bool| {
        let key = format!("{k}_gbps");
        if eight { t["flows_8"][&key].as_f64() } else { t[&key].as_f64() }.unwrap_or(0.0)
    };
    let max = rows.iter().flat_map(|(k, _)| [val(k, false), val(k, true)]).fold(0.0, f64::max).max(0.1);
    let root = SVGBackend::new(out, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Bulk TCP throughput (iperf3), Gbit/s", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..rows.len() as f64, 0f64..max * 1.15)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 {
                rows.get(i).map(|r| r.1.to_owned()).unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("Gbit/s")
        .draw()
        .map_err(err)?;
    for (eight, color, label) in [(false, COLORS[1], "1 flow"), (true, COLORS[4], "8 flows")] {
        let off = if eight { 0.5 } else { 0.1 };
        chart
            .draw_series(rows.iter().enumerate().map(|(i, (k, _))| {
                let x = i as f64 + off;
                Rectangle::new([(x, 0.0), (x + 0.4, val(k, eight))], color.filled())
            }))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
        chart
            .draw_series(rows.iter().enumerate().map(|(i, (k, _))| {
                let x = i as f64 + off + 0.05;
                Text::new(format!("{:.2}", val(k, eight)), (x, val(k, eight) + max * 0.02), ("sans-serif", 13))
            }))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Policy decision latency (p50, p99) per engine size.
pub fn policy(v: &Value, out: &Path) -> anyhow::Result<()> {
    let rows = v["policy"]["rows"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return Ok(());
    }
    let label = |r: &Value| format!("{}p×{}w", r["policies"], r["workloads"]);
    let max = rows.iter().filter_map(|r| r["p99_ns"].as_f64()).fold(0.0, f64::max).max(1.0);
    let root = SVGBackend::new(out, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let n = rows.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption("Policy decision latency (ns) by policies × workloads", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.5f64..n - 0.5, 0f64..max.max(1000.0) * 1.1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(rows.len())
        .x_label_formatter(&|x| rows.get(x.round() as usize).map(label).unwrap_or_default())
        .x_label_style(("sans-serif", 10))
        .y_desc("ns")
        .draw()
        .map_err(err)?;
    for (q, color) in [("p50_ns", COLORS[1]), ("p99_ns", COLORS[4])] {
        let pts: Vec<(f64, f64)> =
            rows.iter().enumerate().filter_map(|(i, r)| r[q].as_f64().map(|y| (i as f64, y))).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(q)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 3, color.filled()))).map_err(err)?;
    }
    chart
        .draw_series(LineSeries::new(vec![(-0.5, 1000.0), (n - 0.5, 1000.0)], BLACK.stroke_width(1)))
        .map_err(err)?
        .label("goal: p99 < 1 µs")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).border_style(BLACK).draw().map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
