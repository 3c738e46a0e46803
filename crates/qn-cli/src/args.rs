//! Value parsers shared by the subcommands: every number is checked where clap reads it, so that a
//! bad value is a one-line usage error (exit 2) naming the argument, before anything is loaded.

use qn_train::NoiseSpec;

/// A finite number greater than zero.
pub fn parse_positive_f64(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{s} is not a positive finite number"));
    }
    Ok(v)
}

/// A size in bytes: a whole number, or a number with a unit (`kB`, `MB`, `GB` in powers of
/// 1000; `KiB`, `MiB`, `GiB` in powers of 1024; `B`), e.g. `4000000`, `4MB`, `3.5MiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "`{u}` in `{s}` is not a size unit (B, kB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 4000000, 4MB, 3.5MiB)"))?;
    let bytes = (v * scale).round();
    if !(bytes.is_finite() && (1.0..1e18).contains(&bytes)) {
        return Err(format!("{s} is not a positive size"));
    }
    Ok(bytes as u64)
}

/// A count of one or more with no upper bound (clap's `range(1..)` would print its bound,
/// 18446744073709551615, in the error).
pub fn parse_positive_count(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("0 is not a positive count".to_string()),
        Ok(v) => Ok(v),
        Err(_) => Err(format!("`{s}` is not a positive whole number")),
    }
}

/// A noise spec (`none`, `block:p=…`, `pq:…`, `scalar:…`) or a bare probability meaning block drop
/// at that rate.
pub fn parse_probability_or_spec(s: &str) -> Result<NoiseSpec, String> {
    if let Ok(p) = s.trim().parse::<f64>() {
        if !(0.0..=1.0).contains(&p) {
            return Err(format!("{s} is not a probability in [0, 1]"));
        }
        return Ok(if p == 0.0 {
            NoiseSpec::None
        } else {
            NoiseSpec::Block { p, bs: None }
        });
    }
    s.parse::<NoiseSpec>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_read_with_and_without_units() {
        assert_eq!(parse_size("4000000"), Ok(4_000_000));
        assert_eq!(parse_size("4MB"), Ok(4_000_000));
        assert_eq!(parse_size(" 3.5 MiB "), Ok(3_670_016));
        assert_eq!(parse_size("800kB"), Ok(800_000));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("12b"), Ok(12));
        for bad in ["", "MB", "0", "0.1", "-4MB", "4 parsecs", "1e30", "4..5MB"] {
            assert!(parse_size(bad).is_err(), "{bad} was accepted");
        }
    }
}
