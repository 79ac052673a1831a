//! Man pages and shell completions, generated from a binary's clap definition.
//!
//! Both binaries answer `--generate DIR` (as their only arguments, and not shown in their
//! help) by writing, from the same clap definition that parses their command line:
//!
//! - `DIR/man/NAME.1`, and one `DIR/man/NAME-SUB.1` per subcommand (`velium-send.1`, ...);
//! - `DIR/completions/NAME.bash`, `DIR/completions/_NAME` (zsh) and
//!   `DIR/completions/NAME.fish`.
//!
//! `scripts/package` installs them in the Debian package; README.md, "Install", shows where
//! they go by hand.

use clap::Command;
use clap_complete::Shell;
use clap_mangen::Man;
use roff::{Roff, roman};
use std::ffi::OsString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The shells completions are written for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// The directory of `PROGRAM --generate DIR`, when those are exactly the arguments given.
/// Any other command line is left to clap (so `--generate` alone is an unknown argument).
pub fn requested() -> Option<PathBuf> {
    requested_in(std::env::args_os())
}

fn requested_in(args: impl IntoIterator<Item = OsString>) -> Option<PathBuf> {
    let args: Vec<OsString> = args.into_iter().skip(1).collect();
    match args.as_slice() {
        [flag, dir] if flag == "--generate" => Some(PathBuf::from(dir)),
        _ => None,
    }
}

/// A section of the top-level man page beyond what clap knows: a heading and its text, in
/// the form `after_help` is written in (see [`paragraphs`]).
pub type Section = (&'static str, &'static str);

/// Writes the man pages and completions of `cmd` under `dir` (see the module's
/// documentation); `sections` are added to the top-level page, before SEE ALSO, which
/// names `see_also`. Returns the files written.
pub fn generate(
    cmd: Command,
    sections: &[Section],
    see_also: &[&str],
    dir: &Path,
) -> io::Result<Vec<PathBuf>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let name = cmd.get_name().to_string();
    let man_dir = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man_dir)?;
    std::fs::create_dir_all(&completions)?;

    let mut written = Vec::new();
    let top = man_dir.join(format!("{name}.1"));
    let mut refs: Vec<String> = see_also.iter().map(|s| s.to_string()).collect();
    refs.extend(visible_subcommands(&cmd).map(|s| format!("{}(1)", s.get_display_name().unwrap())));
    let source = format!("{name} {}", cmd.get_version().unwrap_or_default());
    write_page(&cmd, &source, sections, &refs, &top)?;
    written.push(top);
    for sub in visible_subcommands(&cmd) {
        let page = man_dir.join(format!("{}.1", sub.get_display_name().unwrap()));
        write_page(sub, &source, &[], &[format!("{name}(1)")], &page)?;
        written.push(page);
    }
    for shell in SHELLS {
        written.push(clap_complete::generate_to(
            shell,
            &mut cmd,
            &name,
            &completions,
        )?);
    }
    Ok(written)
}

fn visible_subcommands(cmd: &Command) -> impl Iterator<Item = &Command> {
    cmd.get_subcommands().filter(|s| !s.is_hide_set())
}

/// One man page: clap_mangen's sections, the `after_help` text as EXAMPLES (or NOTES when
/// it does not start with an example), then `sections` and SEE ALSO.
fn write_page(
    cmd: &Command,
    source: &str,
    sections: &[Section],
    see_also: &[String],
    path: &Path,
) -> io::Result<()> {
    let name = cmd.get_display_name().unwrap_or(cmd.get_name()).to_string();
    let mut cmd = cmd.clone();
    // The server's about repeats its name ("velium-server: a hub ..."), which NAME
    // already shows.
    if let Some(about) = cmd.get_about().map(|a| a.to_string())
        && let Some(rest) = about.strip_prefix(&format!("{name}: "))
    {
        cmd = cmd.about(rest.to_string());
    }
    let man = Man::new(cmd.clone())
        .title(name.to_uppercase())
        .source(source)
        .manual("velium-server");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(&mut out)?;
    }
    let mut roff = Roff::new();
    if let Some(after) = cmd.get_after_long_help().or(cmd.get_after_help()) {
        let after = after.to_string();
        let (heading, body) = match after.split_once('\n') {
            Some((first, rest)) if first.starts_with("Example") && first.ends_with(':') => {
                ("EXAMPLES", rest.to_string())
            }
            _ => ("NOTES", after.clone()),
        };
        roff.control("SH", [heading]);
        paragraphs(&mut roff, &body);
    }
    for (heading, body) in sections {
        roff.control("SH", [*heading]);
        paragraphs(&mut roff, body);
    }
    if !see_also.is_empty() {
        roff.control("SH", ["SEE ALSO"]);
        roff.text([roman(see_also.join(", "))]);
    }
    out.extend_from_slice(roff.to_roff().as_bytes());
    man.render_version_section(&mut out)?;
    let mut file = std::fs::File::create(path)?;
    file.write_all(&out)?;
    file.flush()
}

/// Renders help text: paragraphs separated by blank lines; lines indented by two spaces
/// (command examples, lists) are kept as they are, one per line.
pub fn paragraphs(roff: &mut Roff, text: &str) {
    let mut verbatim = false;
    let mut first = true;
    for block in text.split("\n\n") {
        let block = block.trim_matches('\n');
        if block.is_empty() {
            continue;
        }
        if !first {
            roff.control("PP", []);
        }
        first = false;
        for line in block.lines() {
            let indented = line.starts_with("  ");
            if indented && !verbatim {
                roff.control("nf", []);
                verbatim = true;
            } else if !indented && verbatim {
                roff.control("fi", []);
                verbatim = false;
            }
            roff.text([roman(line)]);
        }
        if verbatim {
            roff.control("fi", []);
            verbatim = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn only_the_exact_form_is_a_request() {
        assert_eq!(
            requested_in(args(&["velium", "--generate", "out"])),
            Some(PathBuf::from("out"))
        );
        assert_eq!(requested_in(args(&["velium", "--generate"])), None);
        assert_eq!(
            requested_in(args(&["velium", "who", "--generate", "x"])),
            None
        );
        assert_eq!(requested_in(args(&["velium-server"])), None);
    }

    #[test]
    fn indented_lines_stay_one_per_line() {
        let mut roff = Roff::new();
        paragraphs(
            &mut roff,
            "Intro text\nwraps.\n\n  cmd one\n  cmd two\nAfter.",
        );
        let out = roff.to_roff();
        assert!(
            out.contains(".nf\n  cmd one\n  cmd two\n.fi\nAfter."),
            "{out}"
        );
        assert!(out.contains("Intro text\nwraps.\n.PP\n"), "{out}");
    }
}
