//! Bounds on the collections a peer sends: a capacity report's lists
//! are read by every routing decision for its node, so their length is
//! checked as they are read (docs/SECURITY.md).

use serde::Deserialize;

/// Most GPUs (or MIG instances) a registration or capacity report may
/// list: 32 GPUs of 7 instances each fit. A longer list is an invalid
/// message: every routing decision for the node reads it
/// (docs/SECURITY.md).
pub const MAX_REPORTED_DEVICES: usize = 256;
/// Most kinds a capacity report may list in each of its maps, as many as
/// a node may declare.
pub const MAX_REPORTED_KINDS: usize = 32;

/// A collection read as usual, refused when it holds more than `MAX`.
pub(crate) fn at_most<'de, const MAX: usize, D, C>(deserializer: D) -> Result<C, D::Error>
where
    D: serde::Deserializer<'de>,
    C: Deserialize<'de>,
    for<'a> &'a C: IntoIterator,
{
    let items = C::deserialize(deserializer)?;
    let len = (&items).into_iter().count();
    if len > MAX {
        return Err(serde::de::Error::custom(format_args!(
            "{len} entries where at most {MAX} are allowed"
        )));
    }
    Ok(items)
}
