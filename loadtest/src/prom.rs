//! Reading a server's Prometheus text (`GET /metrics`): series by name, histograms from
//! their buckets. Scrapes are summed over replicas and subtracted from each other, so a
//! phase's histogram is exactly the observations made during it.

use std::collections::HashMap;

/// Every series of one or more scrapes: `name{labels}` → value.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    series: HashMap<String, f64>,
}

/// A histogram's observations, from its cumulative buckets.
#[derive(Debug, Clone, Default)]
pub struct Hist {
    /// (upper bound, cumulative count), ascending; the last bound may be infinite.
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let mut series = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // The value follows the last space outside the labels (label values may hold spaces).
            let split = match line.rfind('}') {
                Some(close) => line[close..].find(' ').map(|i| close + i),
                None => line.find(' '),
            };
            let Some(split) = split else { continue };
            let value = line[split..].split_whitespace().next().unwrap_or("");
            if let Ok(v) = value.parse::<f64>() {
                *series.entry(line[..split].to_string()).or_insert(0.0) += v;
            }
        }
        Self { series }
    }

    /// Adds another scrape's series (another replica's).
    pub fn add(&mut self, other: &Scrape) {
        for (k, v) in &other.series {
            *self.series.entry(k.clone()).or_insert(0.0) += v;
        }
    }

    /// What happened since `before`.
    pub fn since(&self, before: &Scrape) -> Scrape {
        let mut series = self.series.clone();
        for (k, v) in &before.series {
            *series.entry(k.clone()).or_insert(0.0) -= v;
        }
        Scrape { series }
    }

    /// The sum over every series named `name`, whatever its labels.
    pub fn total(&self, name: &str) -> f64 {
        self.series
            .iter()
            .filter(|(k, _)| k.split('{').next() == Some(name))
            .map(|(_, v)| v)
            .sum()
    }

    /// The histogram `name` (absent series count as empty).
    pub fn hist(&self, name: &str) -> Hist {
        let prefix = format!("{name}_bucket{{");
        let mut buckets: Vec<(f64, f64)> = self
            .series
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, v)| {
                let le = k.split("le=\"").nth(1)?.split('"').next()?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, *v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Hist {
            buckets,
            sum: self.total(&format!("{name}_sum")),
            count: self.total(&format!("{name}_count")),
        }
    }
}

impl Hist {
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// The upper bound of the bucket holding the `q` quantile (so "at most this");
    /// infinite when it is beyond the last finite bucket.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        self.buckets
            .iter()
            .find(|(_, cumulative)| *cumulative >= rank)
            .map(|(bound, _)| *bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE fanout_commit_batch_size histogram
fanout_commit_batch_size_bucket{le="1"} 2
fanout_commit_batch_size_bucket{le="2"} 5
fanout_commit_batch_size_bucket{le="4"} 10
fanout_commit_batch_size_bucket{le="+Inf"} 10
fanout_commit_batch_size_sum 25
fanout_commit_batch_size_count 10
fanout_resyncs_total{reason="expired"} 1
fanout_resyncs_total{reason="too_far behind"} 2
fanout_gap_fills_total 3
"#;

    #[test]
    fn histograms_and_counters_parse() {
        let s = Scrape::parse(TEXT);
        let h = s.hist("fanout_commit_batch_size");
        assert_eq!(h.count, 10.0);
        assert_eq!(h.mean(), Some(2.5));
        assert_eq!(h.quantile_bound(0.5), Some(2.0));
        assert_eq!(h.quantile_bound(0.99), Some(4.0));
        assert_eq!(s.total("fanout_resyncs_total"), 3.0);
        assert_eq!(s.total("fanout_gap_fills_total"), 3.0);
        assert_eq!(s.hist("absent").quantile_bound(0.5), None);
    }

    #[test]
    fn scrapes_add_and_subtract() {
        let one = Scrape::parse(TEXT);
        let mut two = one.clone();
        two.add(&one);
        assert_eq!(two.hist("fanout_commit_batch_size").count, 20.0);
        let d = two.since(&one);
        assert_eq!(d.hist("fanout_commit_batch_size").count, 10.0);
        assert_eq!(d.total("fanout_gap_fills_total"), 3.0);
    }
}
