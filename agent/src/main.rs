//! lingua-agent
fn main() {}
