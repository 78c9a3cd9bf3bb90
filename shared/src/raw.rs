//! JSON carried as the text it came as: a job's payload goes from the
//! client's request to the executor, and its output from the executor to
//! the client's answer, without being parsed into a tree and written out
//! again at each hop. The text is checked to be JSON where it enters.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// One JSON value, as text. Two are equal when their texts are: `{"a":1}`
/// and `{ "a": 1 }` differ. It holds only JSON a [`serde_json::Value`] would take, at
/// most [`MAX_DEPTH`] levels deep, so a parser that reads it later, alone
/// or inside a frame or a record, takes it too.
#[derive(Clone, Serialize)]
#[serde(transparent)]
pub struct RawJson(Box<RawValue>);

impl<'de> Deserialize<'de> for RawJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        let mut reader = serde_json::Deserializer::from_str(raw.get());
        let strict = Strict { left: MAX_DEPTH };
        if let Err(err) = strict.deserialize(&mut reader) {
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

/// How deep a value kept as text may nest: a parser that reads it later
/// inside a frame or a record (a few levels more) stays within its 128.
pub const MAX_DEPTH: u32 = 100;

/// JSON read as a [`serde_json::Value`] reads it, without building one: numbers in
/// range, no lone surrogate, at most `left` more levels. A raw value is
/// only skipped over, which lets all three through.
#[derive(Clone, Copy)]
struct Strict {
    left: u32,
}

impl Strict {
    fn deeper<E: de::Error>(self) -> Result<Self, E> {
        match self.left.checked_sub(1) {
            Some(left) => Ok(Self { left }),
            None => Err(E::custom(format_args!(
                "nested deeper than {MAX_DEPTH} levels"
            ))),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.deeper()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.deeper()?;
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
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
    use serde_json::{Value, json};

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
            serde_json::from_str::<Value>(carrier.payload.get()).unwrap(),
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
            format!("{}{}", "[".repeat(128), "]".repeat(128)),
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
        // Room for the frame or record around it.
        let nested = |levels: usize| {
            format!(
                "{}1{}",
                "[{\"a\":".repeat(levels / 2),
                "}]".repeat(levels / 2)
            )
        };
        assert!(serde_json::from_str::<RawJson>(&nested(100)).is_ok());
        let error = serde_json::from_str::<RawJson>(&nested(102)).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("nested deeper than 100 levels"),
            "{error}"
        );
        assert_eq!(RawJson::default().get(), "null");
        assert_eq!(RawJson::of(&json!({"b": 2})).get(), r#"{"b":2}"#);
    }
}
