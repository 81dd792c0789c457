//! `certs`: writes the testbed's CA and server certificate (replacing the original's
//! `openssl genrsa/req/x509` steps) and prints what it wrote with SHA-256 fingerprints.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

/// Make a CA and a server certificate signed by it, for the TLS echo server and its clients.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Directory for ca.crt, ca.key, server.crt, server.key.
    #[arg(long, default_value = "certs")]
    out: PathBuf,
    /// Extra subject alternative name (DNS name or IP address); repeatable. localhost, 127.0.0.1
    /// and ::1 are always included.
    #[arg(long = "san", value_name = "NAME_OR_IP")]
    sans: Vec<String>,
    /// Validity in days.
    #[arg(long, default_value_t = certs::DEFAULT_DAYS)]
    days: u32,
    /// RSA 2048 keys (like the original openssl steps) instead of ECDSA P-256.
    #[arg(long)]
    rsa: bool,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    testbed::docs::generate_if_asked::<Args>(&[]);
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("certs: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let opts = certs::Options {
        extra_sans: args.sans.clone(),
        days: args.days,
        algorithm: if args.rsa {
            certs::KeyAlgorithm::Rsa2048
        } else {
            certs::KeyAlgorithm::EcdsaP256
        },
    };
    let set = certs::generate(&opts).context("cannot make certificates")?;
    let written = set
        .write_to(&args.out, args.force)
        .context("cannot write certificates")?;
    let kind = if args.rsa { "RSA 2048" } else { "ECDSA P-256" };
    println!(
        "certs: {kind} keys, valid {} days, server SANs: {}",
        args.days,
        opts.sans().join(", ")
    );
    for f in &written {
        match &f.fingerprint {
            Some(fp) => println!(
                "wrote {} (mode {:o})  SHA-256 {fp}",
                f.path.display(),
                f.mode
            ),
            None => println!("wrote {} (mode {:o})", f.path.display(), f.mode),
        }
    }
    Ok(())
}
