//! Man pages and shell completions generated from a binary's command-line
//! definition (`clap`), so they never drift from `--help`. Each binary
//! writes them with a hidden `--generate-docs DIR` flag, which packaging
//! runs (packaging/check.sh).

use std::io;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// The hidden `--generate-docs DIR` flag of every binary (flattened into
/// its command line).
#[derive(Debug, Clone, clap::Args)]
pub struct DocsFlag {
    /// Write the man page and shell completions into DIR and exit
    /// (packaging).
    #[arg(long, hide = true, value_name = "DIR", exclusive = true)]
    pub generate_docs: Option<PathBuf>,
}

/// Writes `NAME.1` (a man page) and the bash (`NAME`), zsh (`_NAME`) and
/// fish (`NAME.fish`) completions of `command` into `dir`.
pub fn generate(mut command: clap::Command, dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let name = command.get_name().to_owned();
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page)?;
    std::fs::write(dir.join(format!("{name}.1")), page)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut command, &name, dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{Arg, Command};

    use super::*;

    #[test]
    fn a_man_page_and_three_completions() {
        let dir = tempfile::tempdir().unwrap();
        let command = Command::new("lingua-demo-cli")
            .about("A command for the test")
            .arg(Arg::new("config").long("config").help("The config file"));
        generate(command, dir.path()).unwrap();
        let page = std::fs::read_to_string(dir.path().join("lingua-demo-cli.1")).unwrap();
        assert!(
            page.contains(".TH lingua-demo-cli 1") && page.contains("config"),
            "{page}"
        );
        for file in [
            "lingua-demo-cli.bash",
            "_lingua-demo-cli",
            "lingua-demo-cli.fish",
        ] {
            let text = std::fs::read_to_string(dir.path().join(file)).unwrap();
            assert!(text.contains("config"), "{file}: {text}");
        }
    }
}
