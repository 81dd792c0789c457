//! The application: the connect form, the chat state, the live connection, and the actions the
//! window can take (connect, send, reconnect, change server). Drawing lives in `view`; this part
//! decides what happens.

use std::path::PathBuf;
use std::sync::Arc;

use chat_server::protocol::Nickname;
use chrono::Utc;
use tracing::warn;

use crate::net::{format_target, Connection};
use crate::settings::{self, LastValues};
use crate::state::{ChatState, Phase};

/// How the app was started.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub nick: Option<String>,
    /// Connect at once with the values given, skipping the dialog.
    pub connect: bool,
    /// Where the last values are kept (None: nowhere).
    pub settings_path: Option<PathBuf>,
}

/// Which screen is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screen {
    Dialog,
    Chat,
}

/// The connect dialog's fields, as typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Form {
    pub host: String,
    pub port: String,
    pub nick: String,
}

/// See the module comment.
pub struct ChatApp {
    pub state: ChatState,
    pub form: Form,
    pub screen: Screen,
    /// The message being typed.
    pub input: String,
    /// A problem with the form itself (bad port, bad nickname), shown under it.
    pub form_error: Option<String>,
    /// The settings file could not be read or written.
    pub settings_warning: Option<String>,
    pub(crate) conn: Option<Connection>,
    settings_path: Option<PathBuf>,
    /// Host and port of the current connection (reconnect uses them).
    server: Option<(String, u16)>,
    connect_on_start: bool,
    pub(crate) focus_input: bool,
    /// Put the cursor in the nickname field (the dialog just appeared): Enter connects.
    pub(crate) focus_nick: bool,
    pub(crate) styled: bool,
}

impl ChatApp {
    pub fn new(options: Options) -> ChatApp {
        let mut settings_warning = None;
        let last = match options.settings_path.as_deref().map(settings::load) {
            Some(Ok(Some(v))) => v,
            Some(Err(e)) => {
                warn!("{e}");
                settings_warning = Some(format!("Last values not loaded: {e}"));
                LastValues::default()
            }
            Some(Ok(None)) | None => LastValues::default(),
        };
        let form = Form {
            host: options.host.unwrap_or(last.host),
            port: options.port.unwrap_or(last.port).to_string(),
            nick: options.nick.unwrap_or(last.nick),
        };
        ChatApp {
            state: ChatState::new(),
            form,
            screen: if options.connect {
                Screen::Chat
            } else {
                Screen::Dialog
            },
            input: String::new(),
            form_error: None,
            settings_warning,
            conn: None,
            settings_path: options.settings_path,
            server: None,
            connect_on_start: options.connect,
            focus_input: false,
            focus_nick: !options.connect,
            styled: false,
        }
    }

    /// Draws one frame (also what egui_kittest drives).
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        if !self.styled {
            crate::theme::apply(ui.ctx());
            self.styled = true;
        }
        if std::mem::take(&mut self.connect_on_start) {
            self.submit_form(ui.ctx());
        }
        self.poll_network();
        crate::view::show(self, ui);
    }

    /// Takes every waiting network event into the state.
    pub fn poll_network(&mut self) {
        let Some(conn) = &self.conn else {
            return;
        };
        let before = self.state.phase;
        while let Some(event) = conn.poll() {
            for reply in self.state.apply(event, Utc::now()) {
                conn.send(&reply);
            }
        }
        match self.state.phase {
            // Just joined (from the dialog, --connect or Reconnect): ready to type.
            Phase::Chatting if before != Phase::Chatting => {
                self.screen = Screen::Chat;
                self.focus_input = true;
            }
            Phase::Naming if self.state.nick_refused => {
                // Ask for another name in the dialog; the connection stays open meanwhile.
                if self.screen == Screen::Chat {
                    self.form.nick = self.state.nick.clone();
                    self.focus_nick = true;
                }
                self.screen = Screen::Dialog;
            }
            _ => {}
        }
    }

    /// The dialog's Connect: check the fields, remember them, then connect (or, when the server
    /// only refused the nickname, try the new one on the open connection).
    pub fn submit_form(&mut self, ctx: &egui::Context) {
        self.form_error = None;
        let host = self.form.host.trim().to_string();
        if host.is_empty() {
            self.form_error = Some("Host is empty".into());
            return;
        }
        let port = match self.form.port.trim().parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                self.form_error = Some(format!(
                    "Port {:?} is not a number from 1 to 65535",
                    self.form.port.trim()
                ));
                return;
            }
        };
        let nick = match Nickname::parse(self.form.nick.trim()) {
            Ok(n) => n.to_string(),
            Err(e) => {
                self.form_error = Some(capitalise(&e.to_string()));
                return;
            }
        };
        self.remember(&host, port, &nick);
        let same_server = self.server.as_ref() == Some(&(host.clone(), port));
        if let (true, true, Some(conn)) = (
            same_server,
            self.state.phase == Phase::Naming,
            self.conn.as_ref(),
        ) {
            conn.send(&nick);
            self.state.renaming(&nick);
            return;
        }
        self.connect(ctx, host, port, nick);
    }

    /// Connects again to the last server with the current nickname.
    pub fn reconnect(&mut self, ctx: &egui::Context) {
        match self.server.clone() {
            Some((host, port)) => {
                let nick = self.state.nick.clone();
                self.connect(ctx, host, port, nick);
            }
            None => self.submit_form(ctx),
        }
    }

    /// Leaves the room and goes back to the dialog.
    pub fn change_server(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.state.phase == Phase::Chatting {
                conn.send("/quit");
            }
        }
        self.state = ChatState::new();
        self.server = None;
        self.screen = Screen::Dialog;
        self.focus_nick = true;
    }

    /// Sends the input line (Enter or the Send button).
    pub fn send_input(&mut self) {
        let text = self.input.trim_end_matches(['\r', '\n']).to_string();
        if text.trim().is_empty() || self.state.phase != Phase::Chatting {
            return;
        }
        if let Some(conn) = &self.conn {
            conn.send(&text);
            self.input.clear();
        }
        self.focus_input = true;
    }

    fn connect(&mut self, ctx: &egui::Context, host: String, port: u16, nick: String) {
        // Dropping the old connection closes it.
        self.conn = None;
        self.state.connecting(&format_target(&host, port), &nick);
        let ctx = ctx.clone();
        self.conn = Some(Connection::start(
            &host,
            port,
            Arc::new(move || ctx.request_repaint()),
        ));
        self.server = Some((host, port));
    }

    fn remember(&mut self, host: &str, port: u16, nick: &str) {
        let Some(path) = &self.settings_path else {
            return;
        };
        let values = LastValues {
            host: host.to_string(),
            port,
            nick: nick.to_string(),
        };
        if let Err(e) = settings::save(path, &values) {
            warn!("{e}");
            self.settings_warning = Some(format!("Last values not saved: {e}"));
        }
    }
}

pub(crate) fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// eframe entry: the window's frame calls [`ChatApp::ui`].
impl eframe::App for ChatApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        ChatApp::ui(self, ui);
    }
}
