//! JSON carried as the text it came as: a job's payload goes from the
//! client's request to the executor, and its output from the executor to
//! the client's answer, without being parsed into a tree and written out
//! again at each hop. The text is checked to be JSON where it enters.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// One JSON value, as text. Two are equal when their texts are: `{"a":1}`
/// and `{ "a": 1 }` differ.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(Box<RawValue>);

impl RawJson {
    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// `value` written as JSON text: for values that always serialise (a
    /// `Value`, structs of strings and numbers); one that fails is `null`.
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Self {
        Self(serde_json::value::to_raw_value(value).unwrap_or_default())
    }

    /// The value parsed into a tree, for code that looks inside it.
    pub fn to_value(&self) -> Value {
        // The text was read as JSON: it parses again.
        serde_json::from_str(self.get()).unwrap_or_default()
    }
}

impl Default for RawJson {
    /// `null`, as a payload that names none.
    fn default() -> Self {
        Self(RawValue::NULL.to_owned())
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl fmt::Debug for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_text_goes_through_as_it_came() {
        let text = r#"{"payload": {"z": [1, "二"],  "a": null}, "n": 1}"#;
        #[derive(Deserialize, Serialize)]
        struct Carrier {
            payload: RawJson,
            n: u32,
        }
        let carrier: Carrier = serde_json::from_str(text).unwrap();
        assert_eq!(carrier.payload.get(), r#"{"z": [1, "二"],  "a": null}"#);
        assert_eq!(
            serde_json::to_string(&carrier).unwrap(),
            r#"{"payload":{"z": [1, "二"],  "a": null},"n":1}"#
        );
        assert_eq!(
            carrier.payload.to_value(),
            json!({"a": null, "z": [1, "二"]})
        );
    }

    #[test]
    fn only_json_is_taken() {
        assert!(serde_json::from_str::<RawJson>("{\"a\": }").is_err());
        assert!(serde_json::from_str::<RawJson>("nul").is_err());
        assert_eq!(RawJson::default().get(), "null");
        assert_eq!(RawJson::of(&json!({"b": 2})).get(), r#"{"b":2}"#);
    }
}
