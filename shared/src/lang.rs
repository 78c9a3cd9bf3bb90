//! Language codes and directed language pairs.
//!
//! A language is named by its BCP-47 primary language subtag in lowercase
//! (`zh`, `en`, `yue`): two or three ASCII letters. Region, script and other
//! subtags are not part of routing, so they are rejected rather than silently
//! dropped. A pair is directed: `zh:en` (Chinese speech into English) is a
//! different pool from `en:zh`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a string is not a language code or a language pair.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LangError {
    /// The code is not 2 or 3 letters long.
    #[error(
        "language code {0:?} must be a BCP-47 primary subtag of 2 or 3 letters, like \"en\" or \"yue\""
    )]
    Length(String),
    /// The code has something other than lowercase ASCII letters.
    #[error(
        "language code {0:?} must be lowercase ASCII letters only, like \"zh\" (not \"ZH\" or \"zh-CN\")"
    )]
    Characters(String),
    /// A pair is not written `src:tgt`.
    #[error("language pair {0:?} must be written src:tgt, like \"zh:en\"")]
    PairSyntax(String),
    /// A pair whose source and target are the same language.
    #[error("language pair {0:?} has the same source and target language")]
    SamePair(String),
}

/// A validated lowercase BCP-47 primary language subtag (`en`, `zh`, `yue`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LangCode {
    bytes: [u8; 3],
    len: u8,
}

impl LangCode {
    /// Validates `code` as a lowercase 2- or 3-letter primary subtag.
    pub fn new(code: &str) -> Result<Self, LangError> {
        if !(2..=3).contains(&code.len()) {
            return Err(LangError::Length(code.to_owned()));
        }
        if !code.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(LangError::Characters(code.to_owned()));
        }
        let mut bytes = [0u8; 3];
        bytes[..code.len()].copy_from_slice(code.as_bytes());
        Ok(Self {
            bytes,
            len: code.len() as u8,
        })
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        // `new` admits only ASCII letters, which are always valid UTF-8.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)])
            .expect("a LangCode holds only ASCII letters")
    }
}

impl fmt::Display for LangCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for LangCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LangCode({})", self.as_str())
    }
}

impl FromStr for LangCode {
    type Err = LangError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for LangCode {
    type Error = LangError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<LangCode> for String {
    fn from(code: LangCode) -> Self {
        code.as_str().to_owned()
    }
}

/// A directed language pair, written `src:tgt` (`zh:en`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LangPair {
    /// The language spoken.
    pub src: LangCode,
    /// The language produced.
    pub tgt: LangCode,
}

impl LangPair {
    /// Builds a pair, refusing one whose source and target are equal.
    pub fn new(src: LangCode, tgt: LangCode) -> Result<Self, LangError> {
        if src == tgt {
            return Err(LangError::SamePair(format!("{src}:{tgt}")));
        }
        Ok(Self { src, tgt })
    }

    /// Every directed pair a node with these capabilities serves: each
    /// source with each target, except a language with itself. Sorted and
    /// without duplicates.
    pub fn all_from(src_langs: &[LangCode], tgt_langs: &[LangCode]) -> Vec<LangPair> {
        let mut pairs: Vec<LangPair> = src_langs
            .iter()
            .flat_map(|&src| {
                tgt_langs
                    .iter()
                    .filter_map(move |&tgt| LangPair::new(src, tgt).ok())
            })
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        pairs
    }
}

impl fmt::Display for LangPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.src, self.tgt)
    }
}

impl fmt::Debug for LangPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LangPair({self})")
    }
}

impl FromStr for LangPair {
    type Err = LangError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (src, tgt) = s
            .split_once(':')
            .ok_or_else(|| LangError::PairSyntax(s.to_owned()))?;
        Self::new(src.parse()?, tgt.parse()?)
    }
}

impl TryFrom<String> for LangPair {
    type Error = LangError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<LangPair> for String {
    fn from(pair: LangPair) -> Self {
        pair.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lang(s: &str) -> LangCode {
        LangCode::new(s).unwrap()
    }

    #[test]
    fn accepts_two_and_three_letter_codes() {
        assert_eq!(lang("zh").as_str(), "zh");
        assert_eq!(lang("yue").as_str(), "yue");
    }

    #[test]
    fn rejects_garbage_codes() {
        for bad in [
            "", "e", "engl", "ZH", "zh-CN", "z1", "日本", "en ", "e\u{301}",
        ] {
            assert!(LangCode::new(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(matches!(LangCode::new("ZH"), Err(LangError::Characters(_))));
        assert!(matches!(LangCode::new("engl"), Err(LangError::Length(_))));
    }

    #[test]
    fn pair_round_trips_through_text_and_json() {
        let pair: LangPair = "zh:en".parse().unwrap();
        assert_eq!(pair.src, lang("zh"));
        assert_eq!(pair.to_string(), "zh:en");
        let json = serde_json::to_string(&pair).unwrap();
        assert_eq!(json, "\"zh:en\"");
        assert_eq!(serde_json::from_str::<LangPair>(&json).unwrap(), pair);
    }

    #[test]
    fn pair_is_directed_and_rejects_bad_forms() {
        let a: LangPair = "zh:en".parse().unwrap();
        let b: LangPair = "en:zh".parse().unwrap();
        assert_ne!(a, b);
        assert!(matches!(
            "en:en".parse::<LangPair>(),
            Err(LangError::SamePair(_))
        ));
        assert!(matches!(
            "zhen".parse::<LangPair>(),
            Err(LangError::PairSyntax(_))
        ));
        assert!("zh:en:ja".parse::<LangPair>().is_err());
        assert!(serde_json::from_str::<LangPair>("\"ZH:en\"").is_err());
        assert!(serde_json::from_str::<LangCode>("7").is_err());
    }

    #[test]
    fn pairs_from_capabilities_skip_same_language() {
        let pairs = LangPair::all_from(&[lang("zh"), lang("en")], &[lang("en"), lang("ja")]);
        let text: Vec<String> = pairs.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["en:ja", "zh:en", "zh:ja"]);
    }
}
