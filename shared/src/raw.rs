//! JSON carried as the text it came as: a job's payload goes from the
//! client's request to the executor, and its output from the executor to
//! the client's answer, without being parsed into a tree and written out
//! again at each hop. The text is checked to be JSON where it enters.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// One JSON value, as text. Two are equal when their texts are: `{"a":1}`
/// and `{ "a": 1 }` differ. It holds only what a [`Value`] holds too
/// (see [`Strict`]), so code that parses it later cannot fail.
#[derive(Clone, Serialize)]
#[serde(transparent)]
pub struct RawJson(Box<RawValue>);

impl<'de> Deserialize<'de> for RawJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        if let Err(err) = serde_json::from_str::<Strict>(raw.get()) {
            // Its position counts from the value's start, not the text's.
            let text = err.to_string();
            let what = text
                .rsplit_once(" at line ")
                .map_or(text.as_str(), |(what, _)| what);
            return Err(de::Error::custom(format_args!(
                "{what} at line {} column {} of the value",
                err.line(),
                err.column()
            )));
        }
        Ok(Self(raw))
    }
}

/// JSON read as a [`Value`] reads it, without building one: numbers in
/// range, no lone surrogate in a string, at most 128 levels. A raw value
/// is only skipped over, which lets all three through.
struct Strict;

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Strict)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Strict;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value::<Strict>()?;
        }
        Ok(Strict)
    }
}

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

/// For `#[serde(default, deserialize_with = "present")]` on an
/// `Option<RawJson>`: a field that is there, `null` included, is a value
/// (serde's `Option` would read `null` as none).
pub fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<RawJson>, D::Error> {
    RawJson::deserialize(deserializer).map(Some)
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
    fn only_json_a_value_would_read_is_taken() {
        assert!(serde_json::from_str::<RawJson>("{\"a\": }").is_err());
        assert!(serde_json::from_str::<RawJson>("nul").is_err());
        // A raw value alone lets these through; a `Value` refuses them.
        for text in [
            "[1e400]".to_owned(),
            r#"{"k": "\ud800"}"#.to_owned(),
            format!("{}{}", "[".repeat(129), "]".repeat(129)),
        ] {
            assert!(serde_json::from_str::<Box<RawValue>>(&text).is_ok());
            assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
            assert!(serde_json::from_str::<RawJson>(&text).is_err(), "{text}");
        }
        let error = serde_json::from_str::<RawJson>("\n [1, 1e400]").unwrap_err();
        assert_eq!(
            error.to_string(),
            "number out of range at line 1 column 9 of the value"
        );
        let deep = format!("{}{}", "[".repeat(127), "]".repeat(127));
        assert!(serde_json::from_str::<RawJson>(&deep).is_ok());
        assert_eq!(RawJson::default().get(), "null");
        assert_eq!(RawJson::of(&json!({"b": 2})).get(), r#"{"b":2}"#);
    }
}
