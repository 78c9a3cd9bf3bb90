//! What `lingua-demo` and `lingua-bench` share beyond the test harness
//! (`lingua-tests`, whose fleet helpers both binaries use).
#![forbid(unsafe_code)]

/// The `q` quantile (0.0 to 1.0) of a sorted sample by the nearest-rank
/// method; zero (`T::default()`) when the sample is empty.
pub fn percentile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_of_a_sample() {
        let sample: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&sample, 0.50), 50);
        assert_eq!(percentile(&sample, 0.99), 99);
        assert_eq!(percentile(&sample, 0.999), 100);
        assert_eq!(percentile(&[7u64], 0.5), 7);
        assert_eq!(percentile::<u64>(&[], 0.5), 0);
    }
}
