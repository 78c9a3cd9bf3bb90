//! The series of a metric family for label values known in advance,
//! resolved once.

use std::hash::Hash;

use prometheus_client::metrics::family::{Family, MetricConstructor};

/// A family whose series for a few label values are looked up once, when
/// it is made: a hot path finds one of them by comparing a few names,
/// without hashing a label set or taking the family's lock (a job
/// touches about fifteen series, from whichever worker runs it). Other
/// values go through the family as before. The known series exist from
/// the start, at zero.
pub struct Series<L, M, C = fn() -> M> {
    family: Family<L, M, C>,
    label: fn(&'static str) -> L,
    known: Box<[(&'static str, M)]>,
}

impl<L, M, C> Series<L, M, C>
where
    L: Clone + Hash + Eq,
    M: Clone,
    C: MetricConstructor<M>,
{
    /// The series of `family` (a handle to the one registered) whose
    /// labels `label` makes from a value, with those of `values` resolved.
    pub fn new(
        family: Family<L, M, C>,
        label: fn(&'static str) -> L,
        values: &[&'static str],
    ) -> Self {
        let known = values
            .iter()
            .map(|value| (*value, family.get_or_create(&label(value)).clone()))
            .collect();
        Self {
            family,
            label,
            known,
        }
    }

    /// Hands `update` the series of `value`.
    pub fn with(&self, value: &'static str, update: impl FnOnce(&M)) {
        match self.known.iter().find(|(known, _)| *known == value) {
            Some((_, series)) => update(series),
            None => update(&self.family.get_or_create(&(self.label)(value))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ResultLabel;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn known_and_other_values_count_in_the_family() {
        let family = Family::<ResultLabel, Counter>::default();
        let series = Series::new(
            family.clone(),
            |outcome| ResultLabel { outcome },
            &["applied"],
        );
        assert_eq!(
            family
                .get_or_create(&ResultLabel { outcome: "applied" })
                .get(),
            0,
            "known from the start"
        );
        series.with("applied", |c| {
            c.inc();
        });
        series.with("stale", |c| {
            c.inc();
        });
        assert_eq!(
            family
                .get_or_create(&ResultLabel { outcome: "applied" })
                .get(),
            1
        );
        assert_eq!(
            family
                .get_or_create(&ResultLabel { outcome: "stale" })
                .get(),
            1
        );
    }
}
