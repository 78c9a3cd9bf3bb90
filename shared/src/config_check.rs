//! Helpers both binaries use to read their TOML configuration: unknown keys
//! are rejected by the raw structs (`deny_unknown_fields`), and every
//! validation error names the field and, when it came from a file, its line.

use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::Spanned;

/// Why a configuration is unusable. The binaries exit with 64 on each.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key, or a value of the wrong type. The
    /// text names the line and the key.
    #[error("invalid config: {0}")]
    Parse(String),
    /// A value outside what the program accepts.
    #[error("invalid config: {field}{}: {message}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Invalid {
        /// The dotted name of the field.
        field: String,
        /// Its line in the file, when it came from one.
        line: Option<usize>,
        /// What is wrong and what to do.
        message: String,
    },
}

impl ConfigError {
    /// An invalid value that did not come from a line of the file (a
    /// command-line flag, a rule across fields).
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            line: None,
            message: message.into(),
        }
    }
}

/// Reads a config file.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Why `path` cannot serve as a file of trusted CA certificates (PEM),
/// if it cannot: unreadable, not PEM, or no certificate in it.
pub fn check_ca_file(path: &Path) -> Result<(), String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {} ({e})", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not valid PEM ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(())
}

/// Parses TOML into a raw config struct.
pub fn parse<T: DeserializeOwned>(source: &str) -> Result<T, ConfigError> {
    toml::from_str(source).map_err(|e| ConfigError::Parse(e.to_string().trim_end().to_owned()))
}

/// Validates values of one TOML source, naming field and line on errors.
#[derive(Debug, Clone, Copy)]
pub struct Checker<'a> {
    source: &'a str,
}

impl<'a> Checker<'a> {
    /// A checker for values parsed from `source`.
    pub fn new(source: &'a str) -> Self {
        Self { source }
    }

    /// The 1-based line where `span` starts.
    pub fn line(&self, span: Range<usize>) -> usize {
        let end = span.start.min(self.source.len());
        self.source.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// An error about the value at `span`.
    pub fn invalid(
        &self,
        field: impl Into<String>,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            field: field.into(),
            line: Some(self.line(span)),
            message: message.into(),
        }
    }

    /// `value` if it lies in `bounds`, `default` if it is absent.
    pub fn range<T>(
        &self,
        field: impl Into<String>,
        value: Option<Spanned<T>>,
        default: T,
        bounds: RangeInclusive<T>,
    ) -> Result<T, ConfigError>
    where
        T: PartialOrd + Copy + std::fmt::Display,
    {
        let Some(value) = value else {
            return Ok(default);
        };
        let span = value.span();
        let value = value.into_inner();
        if !bounds.contains(&value) {
            return Err(self.invalid(
                field,
                span,
                format!(
                    "{value} is out of range; use a value from {} to {}",
                    bounds.start(),
                    bounds.end()
                ),
            ));
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        a: Option<Spanned<u32>>,
    }

    #[test]
    fn range_errors_name_field_and_line() {
        let source = "\n\na = 7\n";
        let raw: Raw = parse(source).unwrap();
        let check = Checker::new(source);
        let err = check.range("section.a", raw.a, 1, 1..=5).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid config: section.a (line 3): 7 is out of range; use a value from 1 to 5"
        );
        assert_eq!(check.range("a", None, 4, 1..=5).unwrap(), 4);
    }

    #[test]
    fn parse_errors_name_the_unknown_key_and_line() {
        let err = parse::<Raw>("a = 1\nb = 2\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("line 2") && text.contains('b'), "{text}");
    }
}
