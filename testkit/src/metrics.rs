//! Reading a Prometheus text exposition (`GET /metrics`): samples by name and labels, and
//! histograms from their buckets.
//!
//! A test reads one scrape: a counter's value, or its growth between two scrapes. The load
//! generator sums the scrapes of several replicas ([`Metrics::add`]) and subtracts the one
//! taken at the start of a phase ([`Metrics::since`]), so that a histogram holds exactly the
//! observations made during the phase.

use std::collections::BTreeMap;

/// A series: its name and its labels, in exposition order.
type Series = (String, Vec<(String, String)>);

/// The samples of one scrape, or a sum or difference of scrapes.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// The exposition as scraped (empty for a sum or a difference).
    pub text: String,
    /// Value of each series (summed when a series repeats).
    series: BTreeMap<Series, f64>,
}

/// A histogram's observations, from its cumulative buckets.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    /// (upper bound, cumulative count), ascending; the last bound may be infinite.
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Metrics {
    pub fn new(text: String) -> Self {
        let mut series = BTreeMap::new();
        for (key, value) in text.lines().filter_map(parse_line) {
            *series.entry(key).or_insert(0.0) += value;
        }
        Self { text, series }
    }

    /// The sum of the samples named `name` that carry every label of `labels` (others may
    /// be present too); 0 when there is none, as for a counter never incremented.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .filter(|(sample_labels, _)| {
                labels
                    .iter()
                    .all(|(k, v)| sample_labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .fold(0.0, |sum, (_, value)| sum + value)
    }

    /// Every sample named exactly `name`, with its labels.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = (&'a [(String, String)], f64)> + 'a {
        self.series
            .iter()
            .filter(move |((n, _), _)| n == name)
            .map(|((_, labels), value)| (labels.as_slice(), *value))
    }

    /// Adds another scrape's samples (another replica's).
    pub fn add(&mut self, other: &Metrics) {
        self.text.clear();
        for (k, v) in &other.series {
            *self.series.entry(k.clone()).or_insert(0.0) += v;
        }
    }

    /// What happened since `before`.
    pub fn since(&self, before: &Metrics) -> Metrics {
        let mut series = self.series.clone();
        for (k, v) in &before.series {
            *series.entry(k.clone()).or_insert(0.0) -= v;
        }
        Metrics {
            text: String::new(),
            series,
        }
    }

    /// The histogram `name`, its buckets summed over other labels (an absent histogram is
    /// empty).
    pub fn histogram(&self, name: &str) -> Histogram {
        let mut buckets: Vec<(f64, f64)> = self
            .samples(&format!("{name}_bucket"))
            .filter_map(|(labels, v)| {
                let (_, le) = labels.iter().find(|(k, _)| k == "le")?;
                Some((le.parse().ok()?, v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 += later.1;
            }
            same
        });
        Histogram {
            buckets,
            sum: self.get(&format!("{name}_sum"), &[]),
            count: self.get(&format!("{name}_count"), &[]),
        }
    }
}

impl Histogram {
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

/// `name{labels} value [timestamp]`; `None` for comments, blank and unreadable lines.
fn parse_line(line: &str) -> Option<(Series, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let (name, mut rest) = line.split_at(end);
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        (labels, rest) = parse_labels(inner)?;
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(((name.to_string(), labels), value))
}

/// `k="v",…}` (values with the exposition's escapes): the labels and what follows the brace.
fn parse_labels(mut text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = text.split_once('=')?;
        let body = after.trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = body.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => {
                    let (_, c) = chars.next()?;
                    value.push(if c == 'n' { '\n' } else { c });
                }
                (i, '"') => break i + 1,
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        text = &body[end..];
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
fanout_gap_fills_total_other 7
fanout_odd{a="x}y",b="q\"uo\\te\n"} 4 1700000000000
"#;

    #[test]
    fn samples_are_found_by_name_and_labels() {
        let m = Metrics::new(TEXT.to_string());
        assert_eq!(m.get("fanout_resyncs_total", &[]), 3.0);
        assert_eq!(
            m.get("fanout_resyncs_total", &[("reason", "too_far behind")]),
            2.0
        );
        assert_eq!(m.get("fanout_resyncs_total", &[("reason", "none")]), 0.0);
        assert_eq!(m.get("fanout_gap_fills_total", &[]), 3.0);
        assert_eq!(m.get("absent", &[]), 0.0);
        let odd: Vec<_> = m.samples("fanout_odd").collect();
        assert_eq!(odd.len(), 1);
        assert_eq!(
            odd[0].0,
            [
                ("a".to_string(), "x}y".to_string()),
                ("b".to_string(), "q\"uo\\te\n".to_string())
            ]
        );
        assert_eq!(odd[0].1, 4.0);
    }

    #[test]
    fn histograms_parse() {
        let h = Metrics::new(TEXT.to_string()).histogram("fanout_commit_batch_size");
        assert_eq!(h.count, 10.0);
        assert_eq!(h.mean(), Some(2.5));
        assert_eq!(h.quantile_bound(0.5), Some(2.0));
        assert_eq!(h.quantile_bound(0.99), Some(4.0));
        assert_eq!(h.buckets.last(), Some(&(f64::INFINITY, 10.0)));
        let absent = Metrics::default().histogram("absent");
        assert_eq!(absent.quantile_bound(0.5), None);
    }

    #[test]
    fn scrapes_add_and_subtract() {
        let one = Metrics::new(TEXT.to_string());
        let mut two = one.clone();
        two.add(&one);
        assert_eq!(two.histogram("fanout_commit_batch_size").count, 20.0);
        let d = two.since(&one);
        assert_eq!(d.histogram("fanout_commit_batch_size").count, 10.0);
        assert_eq!(d.get("fanout_gap_fills_total", &[]), 3.0);
    }
}
