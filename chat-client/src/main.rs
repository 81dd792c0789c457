//! chat-client command line: prefill or skip the connect dialog, pick the scale, open the window.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use clap::Parser;

use chat_client::app::{ChatApp, Options};

/// Desktop chat client for chat-server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Server host to prefill [default: last used, else 127.0.0.1].
    #[arg(long)]
    host: Option<String>,
    /// Server port to prefill [default: last used, else 7000].
    #[arg(long)]
    port: Option<u16>,
    /// Nickname to prefill [default: last used, else the login name].
    #[arg(long)]
    nick: Option<String>,
    /// Connect at once with these values instead of showing the dialog.
    #[arg(long)]
    connect: bool,
    /// UI scale (1.5 = 150%), on top of the screen's own scale.
    #[arg(long, default_value_t = 1.0)]
    scale: f32,
    /// Where the last values are kept [default: $XDG_CONFIG_HOME/testbed-chat/last.json].
    #[arg(long, env = "TESTBED_CHAT_CONFIG")]
    config: Option<PathBuf>,
    /// Window title (to tell several windows apart).
    #[arg(long, default_value = "testbed chat")]
    title: String,
    /// Log filter (RUST_LOG overrides).
    #[arg(long, default_value = "warn")]
    log_level: String,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("chat-client: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    testbed::docs::generate_if_asked::<Args>(&[]);
    let args = Args::parse();
    testbed::logging::init(&args.log_level);
    if !(0.5..=4.0).contains(&args.scale) {
        return Err(anyhow!("--scale {} is out of range (0.5 to 4)", args.scale));
    }
    let options = Options {
        host: args.host,
        port: args.port,
        nick: args.nick,
        connect: args.connect,
        settings_path: args.config.or_else(chat_client::settings::default_path),
    };
    let scale = args.scale;
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title(&args.title)
            .with_app_id("testbed-chat")
            .with_inner_size([860.0 * scale, 560.0 * scale])
            .with_min_inner_size([520.0 * scale, 360.0 * scale]),
        ..Default::default()
    };
    eframe::run_native(
        &args.title,
        native,
        Box::new(move |cc| {
            cc.egui_ctx.set_zoom_factor(scale);
            Ok(Box::new(ChatApp::new(options)))
        }),
    )
    .map_err(|e| anyhow!("cannot open the window: {e}"))
}
