//! Where a job's time went on the coordinator that dispatched it, stage
//! by stage: the `Server-Timing` header of its answer to the submitting
//! client, and `lingua_job_stage_seconds{stage}`.

use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::STAGES;

/// A job's stages on this coordinator. Stages a job went through more
/// than once (a refusal, a lost node) add up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timing {
    /// Recording the job at submit, with its first pick when nothing
    /// waits ahead of it (one `route_pick`, and the id's index beside it);
    /// its wait for the pair's picking lock counts in `pick`.
    pub start: Duration,
    /// Waiting in the admission queue for room.
    pub queue: Duration,
    /// Choosing a node for a later attempt (`route_pick`, which records
    /// it, and the hints), and every wait for the pair's picking lock
    /// while a routing update of it is written.
    pub pick: Duration,
    /// Recording a failure decided here (`job_finish`).
    pub record: Duration,
    /// From sending `job_assign` (forwarding it through another
    /// instance included) to the node's accept or refusal.
    pub accept: Duration,
    /// From the node's accept to its result, recorded.
    pub run: Duration,
    /// From the result to the answer (read back only when another
    /// instance recorded the result).
    pub answer: Duration,
    /// When the result arrived, until the answer is timed.
    pub(super) result_at: Option<Instant>,
}

impl Timing {
    /// The stages with their names, in the order a job goes through them.
    pub fn stages(&self) -> [(&'static str, Duration); 7] {
        let took = [
            self.start,
            self.queue,
            self.pick,
            self.record,
            self.accept,
            self.run,
            self.answer,
        ];
        std::array::from_fn(|stage| (STAGES[stage], took[stage]))
    }

    /// The answer is ready now: the time since the result is its stage.
    pub(super) fn answered(&mut self, now: Instant) {
        if let Some(result_at) = self.result_at.take() {
            self.answer = now.saturating_duration_since(result_at);
        }
    }

    /// The `Server-Timing` header value: `start;dur=0.412, queue;dur=0,
    /// …` (milliseconds to the microsecond, as the header counts them).
    pub fn header(&self) -> String {
        let mut header = String::with_capacity(160);
        let mut digits = itoa::Buffer::new();
        for (name, took) in self.stages() {
            if !header.is_empty() {
                header.push_str(", ");
            }
            let micros = took.as_micros();
            header.push_str(name);
            header.push_str(";dur=");
            header.push_str(digits.format(micros / 1000));
            header.push('.');
            // The thousandths, zero-padded: 1000 + 5 is written "1005".
            header.push_str(&digits.format(1000 + micros % 1000)[1..]);
        }
        header
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_lists_every_stage_in_milliseconds() {
        let timing = Timing {
            start: Duration::from_micros(412),
            run: Duration::from_millis(150),
            ..Timing::default()
        };
        assert_eq!(
            timing.header(),
            "start;dur=0.412, queue;dur=0.000, pick;dur=0.000, record;dur=0.000, accept;dur=0.000, run;dur=150.000, answer;dur=0.000"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_answer_stage_runs_from_the_result() {
        let mut timing = Timing {
            result_at: Some(Instant::now()),
            ..Timing::default()
        };
        tokio::time::advance(Duration::from_millis(3)).await;
        timing.answered(Instant::now());
        assert_eq!(timing.answer, Duration::from_millis(3));
        assert_eq!(timing.result_at, None);
    }
}
