//! Man pages and shell completions for every program, made from its clap definition so they
//! never disagree with `--help`. Each binary calls [`generate_if_asked`] first thing; the
//! packaging script runs `PROGRAM --generate-docs DIR` (a hidden flag, handled before clap parses
//! anything, so no `Args` struct carries it).

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

/// The hidden flag the packaging script passes.
pub const FLAG: &str = "--generate-docs";

/// When the command line is `PROGRAM --generate-docs DIR`, writes the docs for `A` into DIR and
/// exits (0, or 1 with the reason on stderr). `sections` are extra man page sections, as
/// (title, roff body), placed after OPTIONS — the daemon's EXIT STATUS and SIGNALS, say.
pub fn generate_if_asked<A: CommandFactory>(sections: &[(&str, String)]) {
    let args: Vec<_> = std::env::args_os().skip(1).take(3).collect();
    if args.first().map(|a| a.as_os_str()) != Some(FLAG.as_ref()) {
        return;
    }
    let code = match args.as_slice() {
        [_, dir] => match generate(A::command(), Path::new(dir), sections) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("{FLAG}: {e:#}");
                1
            }
        },
        _ => {
            eprintln!("usage: {FLAG} DIR");
            2
        }
    };
    std::process::exit(code);
}

/// Writes `DIR/man/NAME.1` and `DIR/completions/{NAME.bash,_NAME,NAME.fish}`.
pub fn generate(
    mut cmd: clap::Command,
    dir: &Path,
    sections: &[(&str, String)],
) -> anyhow::Result<()> {
    use anyhow::Context;
    cmd.build();
    let name = cmd.get_name().to_string();
    let man_dir = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man_dir, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let man_path = man_dir.join(format!("{name}.1"));
    std::fs::write(&man_path, man_page(&cmd, sections)?)
        .with_context(|| format!("writing {}", man_path.display()))?;
    for (shell, file) in [
        (Shell::Bash, format!("{name}.bash")),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let path = completions.join(file);
        let mut out =
            std::fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?;
        clap_complete::generate(shell, &mut cmd, &name, &mut out);
        out.flush()?;
    }
    Ok(())
}

/// The man page as roff: clap_mangen's sections, with `sections` after OPTIONS.
pub fn man_page(cmd: &clap::Command, sections: &[(&str, String)]) -> std::io::Result<Vec<u8>> {
    let man = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    for (title, body) in sections {
        writeln!(out, ".SH \"{title}\"")?;
        out.extend_from_slice(body.as_bytes());
    }
    man.render_version_section(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    #[command(name = "demo", version, about = "A demo program")]
    struct Demo {
        /// Where to listen
        #[arg(long, default_value = "127.0.0.1:1")]
        listen: String,
    }

    #[test]
    fn man_page_and_completions_name_every_flag() {
        let dir = tempfile::tempdir().unwrap();
        let extra = [("EXIT STATUS", ".TP\n\\fB3\\fR\nbad config\n".to_string())];
        generate(Demo::command(), dir.path(), &extra).unwrap();
        let man = std::fs::read_to_string(dir.path().join("man/demo.1")).unwrap();
        assert!(man.contains(".TH demo 1"), "{man}");
        assert!(
            man.contains("listen") && man.contains("A demo program"),
            "{man}"
        );
        let exit = man.find(".SH \"EXIT STATUS\"").expect("extra section");
        assert!(exit > man.find(".SH OPTIONS").unwrap(), "after OPTIONS");
        for file in ["demo.bash", "_demo", "demo.fish"] {
            let text = std::fs::read_to_string(dir.path().join("completions").join(file)).unwrap();
            assert!(text.contains("listen"), "{file}: {text}");
        }
    }
}
